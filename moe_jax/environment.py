"""What a run ran with: the Python, the platform and the version of every installed distribution.

`config.json` records `describe()` next to the config (resolve.Resolved.record), so that a result says which
jax, flax, orbax, numpy, ... produced it, not only which config; `constraints.txt` pins the versions the
repository is tested with (`make setup` installs them).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re


def package_versions() -> dict[str, str]:
  """Every installed distribution, canonical name (PEP 503: lower case, runs of '-_.' as '-') -> version,
  sorted by name. A distribution found twice on sys.path (a stale egg-info beside a wheel) keeps the version
  Python imports, the first on the path, which is the order `importlib.metadata.distributions` yields."""
  versions: dict[str, str] = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"]
    if name:  # a broken install can leave metadata without a name: nothing to record
      versions.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
  return dict(sorted(versions.items()))


def describe() -> dict:
  """JSON-safe: the interpreter, the operating system and machine, and `package_versions()`."""
  return {"python": platform.python_version(), "implementation": platform.python_implementation(),
          "platform": platform.platform(), "machine": platform.machine(), "packages": package_versions()}
