"""The model architectures a config can name (model.architecture), and the one call that builds any of them.

Both take a typed `ModelConfig` and return (logits, `model.LmAux`); they differ in their inputs, which
`forward` reads from a batch: the decoder LM its `inputs` [B, L], the encoder-decoder also `decoder_inputs`.
"""

from __future__ import annotations

import jax
from flax import nnx

from moe_jax.config_lib import ModelConfig
from moe_jax.encdec import EncoderDecoder
from moe_jax.model import LmAux, TransformerLM

ARCHITECTURES = {"decoder": TransformerLM, "encoder_decoder": EncoderDecoder}


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  return ARCHITECTURES[cfg.architecture](cfg, rngs=rngs)


def forward(model: nnx.Module, batch: dict, *, deterministic: bool) -> tuple[jax.Array, LmAux]:
  """Logits for the batch's targets and the MoE auxiliary outputs."""
  if isinstance(model, EncoderDecoder):
    return model(batch["inputs"], batch["decoder_inputs"], deterministic=deterministic)
  return model(batch["inputs"], deterministic=deterministic)
