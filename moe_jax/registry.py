"""The names a config may choose between, declared here so that the schema checks a choice without importing the
code that implements it.

Each kind of choice (a dispatch backend, an activation, an optimizer, ...) lists its valid names; the config
schema (`moe_jax.schema.choice`) validates a field against them, and `moe_jax.config_lib` never imports model
or training code (tests/test_registry.py runs a full validation in a fresh process and checks that). The module
that implements a kind keeps its own table next to the code the names select (`IMPLEMENTED_BY`), and a test
checks that table against the names here: adding a name means adding it in both places, and forgetting one
fails that test. Routers are not listed here: each router family declares itself in `moe_jax.routers`, which
the schema reads directly (it imports no flax either).
"""

from __future__ import annotations

# kind -> the valid names, in the implementing module's order.
NAMES: dict[str, tuple[str, ...]] = {
    "dispatch": ("auto", "einsum", "gather", "dropless", "ragged_dot", "tokamax"),
    "dropless_dispatch": ("auto", "dropless", "ragged_dot", "tokamax"),  # the backends that need moe.dropless=True
    "activation": ("relu", "gelu", "geglu", "swiglu"),
    "dtype": ("float32", "bfloat16"),
    "norm": ("rmsnorm", "layernorm", "layernorm_nobias", "layernorm_noparam"),
    "norm_position": ("pre", "post"),
    "rope_scaling": ("none", "llama3", "longrope"),
    "qk_norm": ("none", "per_head", "full"),
    "attention_bias": ("none", "qkv", "qkvo"),
    "positions": ("rotary", "relative"),
    "remat": ("none", "full", "save_dots"),
    "architecture": ("decoder", "encoder_decoder"),
    "dataset": ("stdlib", "text_dir", "c4/en", "lm1b", "wiki40b/en"),
    "objective": ("causal_lm", "span_corruption"),
    "optimizer": ("adamw", "adafactor"),
    "schedule": ("cosine", "linear", "rsqrt", "constant"),
}

# kind -> (module, attribute) of the table that implements it: a dict or tuple whose keys/items are the names.
# Read only by the test that checks the two agree; nothing here imports these modules.
IMPLEMENTED_BY: dict[str, tuple[str, str]] = {
    "dispatch": ("moe_jax.dispatch", "CHOICES"),
    "dropless_dispatch": ("moe_jax.dispatch", "DROPLESS"),
    "activation": ("moe_jax.experts", "ACTIVATIONS"),
    "dtype": ("moe_jax.moe_layer", "DTYPES"),
    "norm": ("moe_jax.layers", "NORMS"),
    "norm_position": ("moe_jax.model", "NORM_POSITIONS"),
    "rope_scaling": ("moe_jax.layers", "ROPE_SCALINGS"),
    "qk_norm": ("moe_jax.layers", "QK_NORMS"),
    "attention_bias": ("moe_jax.layers", "ATTENTION_BIASES"),
    "positions": ("moe_jax.layers", "POSITIONS"),
    "remat": ("moe_jax.model", "REMAT_POLICIES"),
    "architecture": ("moe_jax.models", "ARCHITECTURES"),
    "dataset": ("moe_jax.data.config", "DATASETS"),
    "objective": ("moe_jax.data.config", "OBJECTIVES"),
    "optimizer": ("moe_jax.optim", "OPTIMIZERS"),
    "schedule": ("moe_jax.optim", "SCHEDULES"),
}


def names(kind: str) -> tuple[str, ...]:
  """The valid names of a kind of choice."""
  return NAMES[kind]
