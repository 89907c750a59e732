"""Meshes and logical-axis rules: how arrays map onto devices.

Mesh axes are ('data', 'fsdp', 'expert', 'tensor'), sizes from `config_lib.MeshConfig`:
  * 'data'   plain data parallelism: the batch is split, parameters are replicated;
  * 'fsdp'   fully sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020, arXiv:1910.02054): the batch is
             split and so are parameters, gradients and optimizer state (along their 'embed' dimension); the
             compiler gathers each weight where it is used and reduce-scatters its gradient;
  * 'expert' expert parallelism: outside MoE layers more data parallelism, inside them the experts are split
             and tokens travel by all_to_all;
  * 'tensor' tensor parallelism (Megatron-LM, Shoeybi et al. 2019, arXiv:1909.08053): attention heads and FFN
             hidden units (dense FFNs and every expert) are split; the batch is *not* split over it.
Sizes of 1 make an axis a no-op, so the ('data', 'expert') meshes of earlier versions are the meshes
(data, 1, expert, 1) and compute what they computed.

Parameters and activations carry *logical* axis names ('embed', 'mlp', 'expert', ...); the one table below
maps them to mesh axes, so a new parallelism layout is a change of rules, not of model code.

Expert parallelism (GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch, Fedus et al. 2021, Sec. 5): one
`jax.shard_map` over the mesh wraps the whole MoE block (`shard_moe_block`). Every device routes its own
routing groups (groups are split over the token axes 'data', 'fsdp', 'expert'), packs them into capacity
buffers [E, G*C, M], and `AllToAllExperts` sends each expert's rows to the device holding that expert and
brings the outputs back: two all-to-alls forward, two backward, and all-reduces only for what is replicated
(the router and auxiliary losses; the expert weights' gradients over 'data' and 'fsdp'). Over 'tensor' the
devices of a group route the same tokens identically, each runs its slice F/t of every expert's hidden units,
and one psum sums the partial outputs (Megatron's row-parallel second matmul). With an 'expert' axis of size 1
the same block is plain data parallelism (no all-to-all).

Axis legend (as in `moe_jax.routing`): G groups · S tokens per group · E experts · C capacity per expert ·
M d_model · F d_ff · T rows per expert.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh, AxisType, Mesh
from jax.sharding import PartitionSpec as P

from moe_jax import config_lib
from moe_jax import experts as experts_lib

MESH_AXES = config_lib.MESH_AXES  # ("data", "fsdp", "expert", "tensor"), declared with the config schema
TOKEN_AXES = ("data", "fsdp", "expert")  # the axes the batch (and the routing groups) are split over

# Logical axis -> mesh axes, for parameters and activations alike. None = replicated. An activation's
# 'embed' is replicated although a parameter's is split over 'fsdp': activations use 'activation_embed'.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", TOKEN_AXES),  # tokens: split over every device but the 'tensor' ones
    ("expert", "expert"),  # stacked expert weights [E, ...]
    # The vocabulary is not split: the byte tokenizer's 259 rows divide by no mesh axis.
    ("vocab", None),
    ("embed", "fsdp"),  # parameters and their optimizer state: FSDP shards along d_model
    ("mlp", "tensor"),  # FFN and expert hidden units
    ("heads", "tensor"),  # attention heads (query, key and value heads alike)
    ("kv", None),
    ("length", None),
    ("layers", None),  # the repetitions of a scanned block pattern (model.scan_layers): each device holds all
    ("activation_embed", None),
    ("unmodeled", None),  # never sharded, e.g. the expert axis of the router kernel [M, E] (Flaxformer's name)
)


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Sizes of the four mesh axes (all >= 1: `moe_jax.resolve` fills in a 0 = "the rest")."""

  data: int = 1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    return (self.data, self.fsdp, self.expert, self.tensor)

  @property
  def devices(self) -> int:
    return math.prod(self.sizes)


def validate_mesh_shape(shape: MeshShape) -> None:
  """Raise ValueError unless the mesh fits the devices (checked before any array is built).

  A multi-process run must use every device; a single process may use its first `shape.devices` devices
  (a one-device reference inside an 8-device test, a benchmark pinned to one device).
  """
  for name, size in zip(MESH_AXES, shape.sizes):
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ValueError(f"mesh.{name}={size!r} must be an integer >= 1")
  available, needed = jax.device_count(), shape.devices
  if needed > available or (jax.process_count() > 1 and needed != available):
    raise ValueError(
        f"mesh.data * mesh.fsdp * mesh.expert * mesh.tensor = {' * '.join(map(str, shape.sizes))} = {needed} "
        f"must {'equal' if jax.process_count() > 1 else 'be at most'} the number of devices ({available}); on "
        "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
    )


def create_mesh(data: int, expert: int = 1, *, fsdp: int = 1, tensor: int = 1) -> Mesh:
  """A ('data', 'fsdp', 'expert', 'tensor') mesh over the first data * fsdp * expert * tensor devices, Auto
  axis types (GSPMD fills in unannotated shardings). 'tensor' varies fastest over the device order, so its
  devices are neighbours (on one host, where its frequent all-reduces are cheapest), then 'expert'."""
  shape = MeshShape(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
  validate_mesh_shape(shape)
  return jax.make_mesh(
      shape.sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
      devices=jax.devices()[: shape.devices],
  )


def create_mesh_for(mesh_config) -> Mesh:
  """The mesh of a resolved `config_lib.MeshConfig` (or anything with its four sizes, all >= 1)."""
  return create_mesh(mesh_config.data, mesh_config.expert, fsdp=mesh_config.fsdp, tensor=mesh_config.tensor)


def describe_mesh(mesh: Mesh) -> list[str]:
  """Lines saying what `mesh` is: its axis sizes, which processes each axis spans (an axis whose devices sit
  on several hosts sends its collectives over the network: 'tensor' should not, 'expert' may), and where this
  process's devices sit in it."""
  lines = [f"mesh {' '.join(f'{n}={mesh.shape[n]}' for n in MESH_AXES)} ({mesh.size} devices, "
           f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''})"]
  devices = mesh.devices  # [data, fsdp, expert, tensor] array of jax.Device
  for axis, name in enumerate(MESH_AXES):
    # Processes along one line of the axis (the others fixed), for the line through each device.
    lines_along = np.moveaxis(devices, axis, -1).reshape(-1, devices.shape[axis])
    spans = max(len({d.process_index for d in line}) for line in lines_along)
    lines.append(f"  {name:<7} size {mesh.shape[name]:<4} "
                 + (f"spans {spans} processes" if spans > 1 else "within each process"))
  mine = [tuple(int(i) for i in index) for index, d in np.ndenumerate(devices)
          if d.process_index == jax.process_index()]
  lines.append(f"  process {jax.process_index()} holds {len(mine)} device(s) at (data, fsdp, expert, tensor) "
               + ", ".join(map(str, mine[:8])) + (" ..." if len(mine) > 8 else ""))
  return lines


def logical_to_spec(logical_axes: tuple[str | None, ...]) -> P:
  """The PartitionSpec that LOGICAL_AXIS_RULES gives a tensor with these logical axes."""
  rules = dict(LOGICAL_AXIS_RULES)
  return P(*(None if name is None else rules[name] for name in logical_axes))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """`x` pinned to the sharding its logical axes give on the context mesh (no-op without a multi-device mesh):
  where GSPMD would otherwise guess a layout for an activation (e.g. gather a weight or split the batch)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


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


def token_devices(mesh: AbstractMesh | Mesh) -> int:
  """Devices the batch and the routing groups are split over (all but 'tensor')."""
  return math.prod(mesh.shape[name] for name in TOKEN_AXES)


def validate_group_sharding(num_groups: int, mesh: AbstractMesh | Mesh) -> None:
  """Routing groups are split over the token axes, whole: their number must divide evenly."""
  devices = token_devices(mesh)
  if num_groups % devices:
    raise ValueError(
        f"the {num_groups} routing groups must split evenly over the {devices} devices of the mesh axes "
        f"{TOKEN_AXES} ({dict(mesh.shape)}): make batch (group_size=0) or batch*length/group_size a multiple "
        f"of {devices}"
    )


def expert_axis_size() -> int:
  """Devices along 'expert' (static); only inside `shard_moe_block`. 1 means the experts are not split."""
  return jax.lax.axis_size("expert")


def tensor_axis_size() -> int:
  """Devices along 'tensor' (static); only inside `shard_moe_block`. > 1: each holds a slice of every expert's
  hidden units, and the block's output must be summed over the axis (`sum_tensor_partials`)."""
  return jax.lax.axis_size("tensor")


def sum_tensor_partials(x: jax.Array) -> jax.Array:
  """Sum over 'tensor' of each device's partial expert outputs (the row-parallel matmul's all-reduce)."""
  return jax.lax.psum(x, "tensor") if tensor_axis_size() > 1 else x


def device_index() -> jax.Array:
  """Linear index of this device over the token axes; only inside `shard_moe_block`. The 'tensor' devices of
  a group share it: they route the same tokens and must draw the same routing noise."""
  return jax.lax.axis_index(TOKEN_AXES)


def tensor_index() -> jax.Array:
  """This device's index along 'tensor'; only inside `shard_moe_block` (e.g. for noise on its slice of F)."""
  return jax.lax.axis_index("tensor")


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


def expert_weight_specs(weights: experts_lib.ExpertWeights, tensor: int) -> experts_lib.ExpertWeights:
  """In-specs of stacked expert weights in `shard_moe_block`: E over 'expert' and, when the 'tensor' axis has
  `tensor` > 1 devices, F over 'tensor' (column-parallel wi_0 / wi_1 [E, M, F], row-parallel wo [E, F, M]).
  M is not split: a weight stored split over 'fsdp' is gathered at the block's boundary (FSDP's all-gather)
  and its gradient reduced back. (With tensor = 1 the specs omit the axis: the block then varies over no
  'tensor' axis and needs no psum, the program of a ('data', 'expert') mesh.)"""
  split = "tensor" if tensor > 1 else None
  column, row = P("expert", None, split), P("expert", split, None)
  return experts_lib.ExpertWeights(wi_0=column, wo=row, wi_1=None if weights.wi_1 is None else column)


def shard_moe_block(block: Callable, weights: experts_lib.ExpertWeights) -> Callable:
  """`block(groups, replicated, expert_sharded, token_ids) -> (out, aux)` as one shard_map over the context mesh.

  groups [G, S, M], token_ids [G, S] (or None) and out are split along G over the token axes (each device gets
  whole routing groups) and
  replicated over 'tensor'; `replicated` (router kernel, PRNG keys) and `aux` are the same on every device, so
  the block must pmean what it returns there; `expert_sharded` are `weights`-like ExpertWeights split along E
  over 'expert' and F over 'tensor' (`expert_weight_specs`). Inside, the block sees G / token devices groups
  and E / n experts of F / t hidden units, reaches the other experts with `AllToAllExperts` and sums the
  hidden-unit slices with `sum_tensor_partials`.
  """
  tokens = P(TOKEN_AXES)
  specs = expert_weight_specs(weights, jax.sharding.get_abstract_mesh().shape["tensor"])
  return jax.shard_map(block, in_specs=(tokens, P(), specs, tokens), out_specs=(tokens, P()))
