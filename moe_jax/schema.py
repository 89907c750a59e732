"""The vocabulary of config fields: a field's type, valid range and meaning, declared once and checked in one place.

`field(default, rule, doc)` declares a field of a `Section` (a frozen dataclass checked on construction);
the rules below say what a value may be and how the range reads in an error message and in docs/config.md.
The experiment's sections live in `moe_jax.config_lib`; a router family declares its options section with the
same vocabulary in its own module (`moe_jax.routers`), which is why this lives below both. It imports only the
name tables of `moe_jax.registry`: no model or training code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import numpy as np

from moe_jax import registry

# Numbers are checked in the dtype they are used in: the model, the optimizer and the schedule compute in float32,
# where 1e300 is inf and 1e-300 is 0 (both finite and positive in Python).
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32

# ----------------------------------------------------------------------------------------------------------
# Rules: a field's type and valid range, checked in one function.


@dataclasses.dataclass(frozen=True)
class Rule:
  kinds: tuple[type, ...]  # accepted Python types (bool is accepted only where listed)
  ok: Callable[[Any], bool]
  allowed: Callable[[], str]  # the valid range in words; a callable because routers register late
  nullable: bool = False  # None is valid (e.g. an optional path)


def at_least(n: int) -> Rule:
  return Rule((int,), lambda v: v >= n, lambda: f">= {n}")


def _finite_in_float32(v: float) -> bool:
  return math.isfinite(v) and abs(v) <= _F32_MAX


def _zero_or_normal_in_float32(v: float) -> bool:
  """0, or at least float32's smallest normal number: smaller values are subnormal, which XLA's CPU and
  accelerator kernels flush to zero."""
  return v == 0 or abs(v) >= _F32_TINY


def _in_float32(v: float) -> float:
  """`v` as float32 holds it (rounded to the nearest float32, subnormals flushed to 0 as XLA's kernels do)."""
  rounded = float(np.float32(v))
  return rounded if abs(rounded) >= _F32_TINY else 0.0


def in_range(low: float, high: float, *, closed_low: bool = True, closed_high: bool = False) -> Rule:
  """A number in the interval, both as given and in float32, where it is used: Adam's b2=0.999999999 is < 1 in
  Python but 1.0 in float32 (and 1 - b2 = 0 makes the first update NaN)."""
  def ok(v):
    return (low <= v if closed_low else low < v) and (v <= high if closed_high else v < high)

  text = f"in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'} in float32"
  return Rule((int, float), lambda v: math.isfinite(v) and ok(v) and ok(_in_float32(v)), lambda: text)


def float_at_least(low: float) -> Rule:
  """A number >= low that float32 holds finite (1e300 is inf there); rounding keeps it >= a float32 `low`."""
  return Rule((int, float), lambda v: _finite_in_float32(v) and v >= low,
              lambda: f">= {low:g} and at most float32's largest {_F32_MAX:.3g}")


def positive() -> Rule:
  return Rule((int, float), lambda v: _finite_in_float32(v) and v > 0 and _zero_or_normal_in_float32(v),
              lambda: f"> 0 and in float32's normal range [{_F32_TINY:.3g}, {_F32_MAX:.3g}]")


def non_negative() -> Rule:
  return Rule((int, float), lambda v: _finite_in_float32(v) and v >= 0 and _zero_or_normal_in_float32(v),
              lambda: f">= 0 (0 or in float32's normal range [{_F32_TINY:.3g}, {_F32_MAX:.3g}])")


def finite() -> Rule:
  return Rule((int, float), lambda v: _finite_in_float32(v) and _zero_or_normal_in_float32(v),
              lambda: f"a finite number (0 or of magnitude in float32's normal range "
                      f"[{_F32_TINY:.3g}, {_F32_MAX:.3g}])")


def boolean() -> Rule:
  return Rule((bool,), lambda v: True, lambda: "True or False")


def one_of(names: Callable[[], tuple[str, ...]]) -> Rule:
  """One of `names()`; a callable, so that names registered after the field was declared count (routers)."""
  return Rule((str,), lambda v: v in names(), lambda: "one of " + ", ".join(repr(n) for n in names()))


def choice(kind: str) -> Rule:
  """One of the names `moe_jax.registry` declares for `kind`."""
  return one_of(lambda: registry.names(kind))


def text(*, nullable: bool = False) -> Rule:
  return Rule((str,), lambda v: bool(v), lambda: "a non-empty string" + (" or None" if nullable else ""),
              nullable=nullable)


def check_value(path: str, value: Any, rule: Rule) -> None:
  """ValueError naming `path`, the value and the rule's range, unless value satisfies the rule."""
  if value is None and rule.nullable:
    return
  # bool is an int in Python: accept it only where a bool is asked for.
  if isinstance(value, bool) and bool not in rule.kinds:
    raise ValueError(f"{path}={value!r} has type bool; expected {rule.allowed()}")
  if not isinstance(value, rule.kinds):
    names = "/".join(k.__name__ for k in rule.kinds)
    raise ValueError(f"{path}={value!r} has type {type(value).__name__}; expected {names} {rule.allowed()}")
  if not rule.ok(value):
    raise ValueError(f"{path}={value!r} must be {rule.allowed()}")


def field(default: Any, rule: Rule, doc: str) -> Any:
  """Declare a config field: its default, valid range and one-line meaning."""
  return dataclasses.field(default=default, metadata={"rule": rule, "doc": doc})


class Section:
  """A config section: a frozen dataclass whose `field`s are checked on construction."""

  NAME: ClassVar[str]

  def __post_init__(self):
    for f in config_fields(type(self)):
      check_value(self.path(f.name), getattr(self, f.name), f.metadata["rule"])
    self._check()

  def _check(self) -> None:
    """Rules relating several fields of the section."""

  @classmethod
  def path(cls, name: str) -> str:
    return f"{cls.NAME}.{name}" if cls.NAME else name

  @classmethod
  def rules_doc(cls) -> str:
    """The section's cross-field rules in words (its `_check` docstring), '' when it has none."""
    if cls._check is Section._check:
      return ""
    return " ".join((cls._check.__doc__ or "").split())


def config_fields(section: type) -> list[dataclasses.Field]:
  """The declared config fields of a section (fields without a rule are derived, not configured)."""
  return [f for f in dataclasses.fields(section) if "rule" in f.metadata]
