"""Shared test set-up: 8 emulated CPU devices for mesh tests, whichever way pytest is started, and one JAX
compilation cache per test process, so that a program compiled by one test is loaded, not recompiled, by the next.

Why the cache: at test sizes XLA compilation is most of a test's time, and many tests compile the same programs
(a training step trained straight and then resumed, the same tiny config in several files). JAX's persistent
compilation cache keys an executable by its HLO, compile options and devices, so a hit is the very program a fresh
compile would give. It lives in a fresh temporary directory per pytest process (per xdist worker: no two writers
share it) and is deleted at the end, so nothing carries over between sessions. Subprocesses that tests start (the
CLI, multi-process runs) do not use it. Tests marked `fresh_compile` compile everything afresh; set
MOE_JAX_TEST_COMPILATION_CACHE=0 to turn the cache off for a whole run.
"""

import os
import shutil
import tempfile

import pytest

# Must happen before jax is imported anywhere; the Makefile exports the same flag.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

_CACHE_ON = os.environ.get("MOE_JAX_TEST_COMPILATION_CACHE", "1") != "0"


def pytest_configure(config):
  if not _CACHE_ON:
    return
  import jax  # pylint: disable=g-import-not-at-top  # after XLA_FLAGS is set

  config._moe_jax_cache_dir = tempfile.mkdtemp(prefix="moe_jax_test_jax_cache_")  # pylint: disable=protected-access
  jax.config.update("jax_compilation_cache_dir", config._moe_jax_cache_dir)  # pylint: disable=protected-access
  # Cache every program: the default skips those compiling in under a second, most of the suite's.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  if getattr(config, "_moe_jax_cache_dir", None):
    shutil.rmtree(config._moe_jax_cache_dir, ignore_errors=True)  # pylint: disable=protected-access


@pytest.fixture(autouse=True)
def _fresh_compile(request):
  """For a `fresh_compile` test, switch the cache off and back on (jax re-reads it at the next compile)."""
  if not (_CACHE_ON and request.node.get_closest_marker("fresh_compile")):
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()
