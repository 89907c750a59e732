"""Meshes and logical-axis rules: how arrays map onto devices.

Mesh axes are ('data', 'expert'). Outside MoE layers the 'expert' axis is extra data parallelism (the batch
is split over both axes); inside, experts are split over 'expert' and tokens travel by all_to_all.

Parameters and activations carry *logical* axis names ('embed', 'mlp', 'expert', ...); the one table below
maps them to mesh axes, so a new parallelism layout is a change of rules, not of model code.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "expert")

# Logical axis -> mesh axes. None = replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),  # tokens outside MoE layers: split over every device
    ("expert", "expert"),  # stacked expert weights [E, ...]
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("length", None),
)


def validate_mesh_shape(data: int, expert: int) -> None:
  """Raise ValueError unless data * expert devices exist (checked before any array is built)."""
  for name, size in (("mesh.data", data), ("mesh.expert", expert)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"{name}={size!r} must be an integer >= 1")
  available = jax.device_count()
  if data * expert != available:
    raise ValueError(
        f"mesh.data * mesh.expert = {data} * {expert} = {data * expert} must equal the number of devices "
        f"({available}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
    )


def create_mesh(data: int, expert: int) -> Mesh:
  """A ('data', 'expert') mesh over all devices, Auto axis types (GSPMD fills in unannotated shardings)."""
  validate_mesh_shape(data, expert)
  return jax.make_mesh((data, expert), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[Mesh]:
  """Set `mesh` and the logical-axis rules: needed to create sharded params and to call the model."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield mesh
