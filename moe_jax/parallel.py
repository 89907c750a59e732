"""Meshes and logical-axis rules: how arrays map onto devices.

Mesh axes are ('data', 'expert'). Outside MoE layers the 'expert' axis is extra data parallelism (the batch
is split over both axes); inside, experts are split over 'expert' and tokens travel by all_to_all.

Parameters and activations carry *logical* axis names ('embed', 'mlp', 'expert', ...); the one table below
maps them to mesh axes, so a new parallelism layout is a change of rules, not of model code.

Expert parallelism (GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch, Fedus et al. 2021, Sec. 5): one
`jax.shard_map` over both mesh axes wraps the whole MoE block (`shard_moe_block`). Every device routes its own
routing groups, packs them into capacity buffers [E, G*C, M], and `AllToAllExperts` sends each expert's rows
to the device holding that expert and brings the outputs back: two all-to-alls forward, two backward, and
all-reduces only for what is replicated (the router and auxiliary losses; the expert weights' gradients
over 'data'). With an 'expert' axis of size 1 the same block is plain data parallelism (no all-to-all).

Axis legend (as in `moe_jax.routing`): G groups · S tokens per group · E experts · C capacity per expert ·
M d_model · T rows per expert.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh, AxisType, Mesh
from jax.sharding import PartitionSpec as P

from moe_jax import experts as experts_lib

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
    ("unmodeled", None),  # never sharded, e.g. the expert axis of the router kernel [M, E] (Flaxformer's name)
)


def validate_mesh_shape(data: int, expert: int) -> None:
  """Raise ValueError unless the mesh fits the devices (checked before any array is built).

  A multi-process run must use every device; a single process may use its first data * expert devices
  (a one-device reference inside an 8-device test, a benchmark pinned to one device).
  """
  for name, size in (("mesh.data", data), ("mesh.expert", expert)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"{name}={size!r} must be an integer >= 1")
  available = jax.device_count()
  if data * expert > available or (jax.process_count() > 1 and data * expert != available):
    raise ValueError(
        f"mesh.data * mesh.expert = {data} * {expert} = {data * expert} must "
        f"{'equal' if jax.process_count() > 1 else 'be at most'} the number of devices ({available}); on CPU set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
    )


def create_mesh(data: int, expert: int) -> Mesh:
  """A ('data', 'expert') mesh over the first data * expert devices, Auto axis types (GSPMD fills in
  unannotated shardings)."""
  validate_mesh_shape(data, expert)
  return jax.make_mesh(
      (data, expert), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
      devices=jax.devices()[: data * expert],
  )


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (e.g. one process was told to stop)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def all_processes(flag: bool) -> bool:
  """True on every process only if `flag` is True on all."""
  return not any_process(not flag)


def gather_strings(text: str) -> list[str]:
  """Every process's `text`, indexed by process (e.g. per-process data-iterator states for a checkpoint)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array(len(data)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: len(data)] = data
  gathered = multihost_utils.process_allgather(padded)
  return [bytes(row[:n]).decode() for row, n in zip(gathered, lengths)]


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[Mesh]:
  """Set `mesh` and the logical-axis rules: needed to create sharded params and to call the model."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield mesh


# ----------------------------------------------------------------------------------------------------------
# Expert parallelism.


def moe_mesh() -> AbstractMesh | None:
  """The context mesh when it spans more than one device (the MoE block then runs in `shard_moe_block`),
  else None (single-device path). Raises ValueError for meshes the block cannot shard over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ValueError(f"an MoE layer needs a mesh with axes {MESH_AXES}; got {tuple(mesh.axis_names)}")
  if any(kind != AxisType.Auto for kind in mesh.axis_types):
    raise ValueError(
        f"an MoE layer needs Auto mesh axes (parallel.create_mesh); got axis types {tuple(mesh.axis_types)}"
    )
  return mesh


def validate_expert_parallelism(num_experts: int, mesh: AbstractMesh | Mesh) -> None:
  """Each device of the 'expert' axis must hold the same whole number of experts."""
  size = mesh.shape["expert"]
  if num_experts % size:
    raise ValueError(
        f"num_experts={num_experts} must be a multiple of the 'expert' mesh axis size {size} "
        "(each device holds num_experts / size experts)"
    )


def validate_group_sharding(num_groups: int, mesh: AbstractMesh | Mesh) -> None:
  """Routing groups are split over every device, whole: their number must divide evenly."""
  if num_groups % mesh.size:
    raise ValueError(
        f"the {num_groups} routing groups must split evenly over the {mesh.size} devices of the mesh "
        f"{dict(mesh.shape)}: make batch (group_size=0) or batch*length/group_size a multiple of {mesh.size}"
    )


def expert_axis_size() -> int:
  """Devices along 'expert' (static); only inside `shard_moe_block`. 1 means the experts are not split."""
  return jax.lax.axis_size("expert")


def device_index() -> jax.Array:
  """Linear index of this device over both mesh axes; only inside `shard_moe_block`."""
  return jax.lax.axis_index(MESH_AXES)


@dataclasses.dataclass(frozen=True)
class AllToAllExperts:
  """The experts of the whole mesh seen from one device: `local` holds this device's E/n experts.

  Takes this device's capacity buffers for all E experts, [E, T, M] expert-major (`moe_jax.dispatch`),
  sends the rows of experts d*E/n .. (d+1)*E/n - 1 to device d of the 'expert' axis (the P('expert')
  sharding of stacked expert weights), runs the local experts on the n*T rows received, and returns the
  outputs to their owners. Implements `Experts.__call__` only: a ragged exchange needs
  `jax.lax.ragged_all_to_all`, which XLA:CPU lacks, so across devices the dropless backends resolve to capacity
  buffers (`moe_jax.dispatch.resolve_backend`). With an 'expert' axis of size 1 the layer does not use this
  class, and every backend runs on the device's own experts.
  """

  local: experts_lib.Experts

  def __call__(self, x: jax.Array) -> jax.Array:  # [E, T, M] -> [E, T, M]
    n = jax.lax.axis_size("expert")
    if n == 1:
      return self.local(x)
    num_experts, rows, d_model = x.shape
    local_experts = num_experts // n
    x = jax.lax.all_to_all(x.reshape(n, local_experts, rows, d_model), "expert", 0, 0)  # [source, E/n, T, M]
    x = jnp.swapaxes(x, 0, 1).reshape(local_experts, n * rows, d_model)
    y = self.local(x)  # [E/n, n*T, M]
    y = jnp.swapaxes(y.reshape(local_experts, n, rows, d_model), 0, 1)  # [source, E/n, T, M]
    y = jax.lax.all_to_all(y, "expert", 0, 0)  # [owner of the expert chunk, E/n, T, M]
    return y.reshape(num_experts, rows, d_model)


def shard_moe_block(block: Callable) -> Callable:
  """`block(groups, replicated, expert_sharded, token_ids) -> (out, aux)` as one shard_map over the context mesh.

  groups [G, S, M], token_ids [G, S] (or None) and out are split along G over both mesh axes (each device gets
  whole routing groups);
  `replicated` (router kernel, PRNG keys) and `aux` are the same on every device, so the block must pmean
  what it returns there; `expert_sharded` arrays [E, ...] are split along E over 'expert'. Inside, the
  block sees G / devices groups and E / n experts, and reaches the others with `AllToAllExperts`.
  """
  tokens = P(MESH_AXES)
  return jax.shard_map(block, in_specs=(tokens, P(), P("expert"), tokens), out_specs=(tokens, P()))
