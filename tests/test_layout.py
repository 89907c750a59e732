"""The code's layout: no module of moe_jax/, experiments/ or benchmarks/ uses another project module's private names
(a leading underscore says "this module's own business"; what others need is public, e.g. moe_jax.runstate)."""

import ast
import os

from tests.helpers import REPO

SCANNED = ("moe_jax", "experiments", "benchmarks")
PROJECT = ("moe_jax", "configs", "experiments", "benchmarks", "tests")  # top-level packages of this repository


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: str) -> list[str]:
  """Every `module._name` (at any depth: `moe_jax.train._name`, `train._Class._x`) and `from module import _name`
  in the file at `path` whose module is this project's (a package above, or a sibling script such as
  benchmarks/harness.py): 'line: code'."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  siblings = {os.path.splitext(name)[0] for name in os.listdir(os.path.dirname(path)) if name.endswith(".py")}

  def ours(module: str) -> bool:
    return module.split(".")[0] in PROJECT or module in siblings

  imported, found = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported.update(alias.asname or alias.name.split(".")[0] for alias in node.names if ours(alias.name))
    elif isinstance(node, ast.ImportFrom) and (node.level > 0 or ours(node.module or "")):
      for alias in node.names:
        imported.add(alias.asname or alias.name)
        if _is_private(alias.name):
          found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _is_private(node.attr):
      base = node.value
      while isinstance(base, ast.Attribute):
        base = base.value
      if isinstance(base, ast.Name) and base.id in imported:
        found.append(f"{node.lineno}: {ast.unparse(node)}")
  return found


def _python_files() -> list[str]:
  return sorted(os.path.join(root, name) for folder in SCANNED for root, _, names in os.walk(os.path.join(REPO, folder))
                for name in names if name.endswith(".py"))


def test_no_module_uses_a_private_name_of_another():
  uses = {os.path.relpath(path, REPO): private_uses(path) for path in _python_files()}
  assert {path: found for path, found in uses.items() if found} == {}


def test_the_check_finds_private_names_of_project_modules_only(tmp_path):
  script = tmp_path / "tool.py"
  script.write_text("import jax\nfrom moe_jax import train\nfrom moe_jax.checkpoint import _release\n"
                    "import moe_jax.runstate as rs\n"
                    "train._prepare(); rs._fresh.x; jax._src; train.__name__; train.public\n")
  assert private_uses(str(script)) == ["3: from moe_jax.checkpoint import _release", "5: train._prepare",
                                       "5: rs._fresh"]
