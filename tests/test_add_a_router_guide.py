"""docs/add_a_router.md works as written: its Python blocks, run in order in one fresh module, add the example
router in-process, build an MoE layer with it and pass the tests the guide writes for it (forward and backward
against the plain-jax.numpy reference, and the capacity fact)."""

import os
import re
import sys
import types

import pytest

from moe_jax import routers

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "add_a_router.md")


def python_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_the_guide_has_the_module_the_registration_the_use_and_the_tests():
  blocks = python_blocks(open(GUIDE).read())
  assert len(blocks) == 4
  assert "FAMILY = family.RouterFamily(" in blocks[0] and "routers.register(FAMILY)" in blocks[1]


@pytest.mark.slow  # ~40 s: the guide's router through the router test suite
def test_the_guide_code_runs_and_its_router_passes_its_tests():
  module = types.ModuleType("add_a_router_guide")  # a real module: dataclasses resolve annotations through it
  sys.modules[module.__name__] = module
  try:
    for block in python_blocks(open(GUIDE).read()):
      exec(compile(block, GUIDE, "exec"), module.__dict__)  # noqa: S102 (the guide's own code)
    tests = [value for name, value in vars(module).items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
      test()
    assert "cosine" in routers.names()
  finally:
    routers.FAMILIES.pop("cosine", None)
    del sys.modules[module.__name__]
  assert "cosine" not in routers.names()
