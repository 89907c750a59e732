"""A run records the environment it ran with; the locked versions are the ones installed; orbax is pinned."""

import importlib.metadata
import json
import os
import platform
import re

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from moe_jax import checkpoint, config_lib, environment, resolve
from tests.helpers import REPO


def test_package_versions_name_every_installed_distribution_with_the_version_python_imports():
  versions = environment.package_versions()
  assert versions["jax"] == jax.__version__ and versions["orbax-checkpoint"] == ocp.__version__
  for name in ("flax", "optax", "numpy", "jaxlib", "ml-collections", "tensorflow-datasets", "grain", "pytest"):
    assert versions[name] == importlib.metadata.version(name), name
  assert list(versions) == sorted(versions)
  assert all(name == re.sub(r"[-_.]+", "-", name).lower() for name in versions)  # one spelling per name


def test_config_json_record_carries_python_platform_and_package_versions():
  run = resolve.resolve(config_lib.default_config(), device_count=1)
  record = json.loads(json.dumps(run.record()))  # what train.py writes to config.json
  env = record["environment"]
  assert env["python"] == platform.python_version() and env["platform"] == platform.platform()
  assert env["packages"] == environment.package_versions()
  assert env["packages"]["jax"] == jax.__version__


def test_the_installed_versions_are_the_locked_ones():
  """`make setup` installs constraints.txt; a venv that drifted from it (or a lock not regenerated after a
  dependency change in setup.cfg) shows here, naming the packages."""
  if os.environ.get("MOE_JAX_UNLOCKED"):
    pytest.skip("MOE_JAX_UNLOCKED is set: the venv was resolved freely (make setup LOCK=)")
  with open(os.path.join(REPO, "constraints.txt")) as f:
    locked = dict(line.strip().split("==") for line in f if line.strip() and not line.startswith("#"))
  installed = environment.package_versions()
  locked = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in locked.items()}
  differ = {name: (version, installed.get(name)) for name, version in locked.items() if installed.get(name) != version}
  assert not differ, f"locked vs installed: {differ}"
  # A requirement added to setup.cfg without `make lock` would install unpinned.
  required = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group()).lower()
              for r in importlib.metadata.requires("moe_jax") if "extra ==" not in r or 'extra == "test"' in r}
  assert required - set(locked) == set()


def test_an_untested_orbax_version_is_refused_naming_the_tested_ones():
  checkpoint.check_orbax_version(ocp.__version__)  # the installed one is tested: no error
  with pytest.raises(ImportError, match=r"tested with orbax-checkpoint 0\.12\.8, not the installed 0\.99\.0.*make setup"):
    checkpoint.check_orbax_version("0.99.0")


@pytest.fixture
def compilation_cache(pytestconfig) -> str:
  """The directory of this test process's compilation cache (tests/conftest.py)."""
  cache = getattr(pytestconfig, "_moe_jax_cache_dir", None)
  if cache is None:
    pytest.skip("MOE_JAX_TEST_COMPILATION_CACHE=0: no cache")
  return cache


def _entries_added_by_a_new_program(cache: str, scale: float) -> set[str]:
  before = set(os.listdir(cache))
  jax.jit(lambda x: jnp.tanh(x * scale) + scale)(jnp.arange(7.0)).block_until_ready()
  return set(os.listdir(cache)) - before


def test_tests_share_compiled_programs_through_the_session_compilation_cache(compilation_cache):
  assert _entries_added_by_a_new_program(compilation_cache, 3.25)


@pytest.mark.fresh_compile
def test_fresh_compile_tests_compile_without_the_cache_and_add_nothing_to_it(compilation_cache):
  assert not _entries_added_by_a_new_program(compilation_cache, 4.75)
