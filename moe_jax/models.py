"""The model architectures a config can name (model.architecture), and the one call that builds any of them.

Both take a typed `ModelConfig` and return (logits, `model.LmAux`); they differ in their inputs, which
`forward` reads from a batch: the decoder LM its `inputs` [B, L], the encoder-decoder also `decoder_inputs`.

`build` works with or without a mesh: under `parallel.mesh_context(mesh)` every parameter is created in the
sharding its logical axes give it; outside any mesh the model is built on the default device, ready to run.
(`moe_jax.runstate.build` makes the model of a whole experiment config in one call, under jit.)
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx

from moe_jax.config_lib import ModelConfig
from moe_jax.encdec import EncoderDecoder
from moe_jax.model import LmAux, TransformerLM

ARCHITECTURES = {"decoder": TransformerLM, "encoder_decoder": EncoderDecoder}


def unplaced_outside_mesh() -> contextlib.AbstractContextManager:
  """Outside a mesh context, Flax's eager sharding off: variables annotated with logical axes (parameters, and
  the optimizer state derived from them) are then created on the default device instead of being refused ("An
  auto mesh context or metadata is required"). Under a mesh it changes nothing: they are placed there."""
  if jax.sharding.get_abstract_mesh().empty:
    return nnx.use_eager_sharding(False)
  return contextlib.nullcontext()


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model of `cfg.architecture`, on the context mesh if there is one, else on the default device."""
  with unplaced_outside_mesh():
    return ARCHITECTURES[cfg.architecture](cfg, rngs=rngs)


def forward(model: nnx.Module, batch: dict, *, deterministic: bool = True) -> tuple[jax.Array, LmAux]:
  """Logits [B, L, V] for the batch's targets and the MoE auxiliary outputs; deterministic (no dropout, no
  router jitter) unless training."""
  if isinstance(model, EncoderDecoder):
    return model(batch["inputs"], batch["decoder_inputs"], deterministic=deterministic)
  return model(batch["inputs"], deterministic=deterministic)
