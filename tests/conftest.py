"""Shared test set-up: 8 emulated CPU devices for mesh tests, whichever way pytest is started."""

import os

# Must happen before jax is imported anywhere; the Makefile exports the same flag.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
