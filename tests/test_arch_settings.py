"""The attention, norm, rotary and output-head settings of the published model families (issue 31: Mixtral,
OLMoE, Qwen, DBRX, Phi-3.5, Llama, OLMo, Switch; docs/interop_fixtures.md says what each computes): the decoder LM
with each setting equals the plain-jnp `reference.decoder_lm` forward and backward (float32, every parameter
perturbed off its init so a dropped or swapped bias or scale shows), each setting changes the function, the
parameter count of `moe_jax.flops` stays exact, and bad values are refused naming the field."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax import config_lib, encdec, flops, layers, parallel, reference
from moe_jax.model import TransformerLM
from tests.helpers import built_param_count

BASE = config_lib.ModelConfig(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
                              num_layers=1, max_seq_len=16, moe_layer_interval=0, init_scale=1.0)
LONGROPE = dict(rope_scaling="longrope", rope_original_max_len=6, rope_short_factor=(1.0, 1.5, 4.0, 9.0),
                rope_long_factor=(1.0, 3.0, 12.0, 40.0), rope_short_mscale=1.25, rope_long_mscale=1.5)

# One entry per setting: the ModelConfig fields it sets beside BASE.
SETTINGS = {
    "norm_eps": dict(norm_eps=0.5),
    "layernorm": dict(norm="layernorm", norm_eps=1e-5),
    "layernorm_nobias": dict(norm="layernorm_nobias", norm_eps=1e-5),
    "layernorm_noparam": dict(norm="layernorm_noparam", norm_eps=1e-5),
    "rope_theta": dict(rope_theta=3.0),
    "scale_attention_off": dict(scale_attention=False),
    "unscaled_tied_head": dict(tie_embeddings=True, scale_tied_head=False),
    "attention_bias_qkv": dict(attention_bias="qkv"),
    "attention_bias_qkvo": dict(attention_bias="qkvo"),
    "lm_head_bias": dict(lm_head_bias=True),
    "qk_norm_per_head": dict(qk_norm="per_head"),
    "qk_norm_full": dict(qk_norm="full"),
    "clip_qkv": dict(clip_qkv=0.4),
    "clip_qkv_after_qk_norm": dict(qk_norm="full", clip_qkv=0.6),
    "norm_position_post": dict(norm_position="post"),
    "rope_llama3": dict(rope_theta=500.0, rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=16),
    "rope_longrope_short": dict(LONGROPE),
    "rope_longrope_long": dict(LONGROPE, rope_original_max_len=4),
}
TOKENS = jax.random.randint(jax.random.key(7), (2, 6), 0, BASE.vocab_size)


def perturbed_model(cfg: config_lib.ModelConfig, *, mesh=None):
  """(graph, params, rest) of the decoder LM with every parameter moved off its init by 0.3 N(0, 1): biases
  nonzero, norm scales away from 1. Eager, as the tests below: the settings share their ops' shapes, so one
  setting reuses the kernels the previous ones compiled (a jitted model compiles anew for each)."""
  with parallel.mesh_context(mesh or parallel.create_mesh(1, 1)):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return graph, params, rest


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_decoder_lm_with_the_setting_equals_its_reference_forward_and_backward(setting):
  cfg = dataclasses.replace(BASE, **SETTINGS[setting])
  graph, params, rest = perturbed_model(cfg)
  cotangent = jax.random.normal(jax.random.key(2), (*TOKENS.shape, cfg.vocab_size))

  def fast(p):
    logits, _ = nnx.merge(graph, p, rest)(TOKENS)
    return jnp.sum(logits * cotangent), logits

  def slow(p, cfg=cfg):
    logits = reference.decoder_lm(cfg, nnx.to_pure_dict(p), TOKENS)
    return jnp.sum(logits * cotangent), logits

  (_, got), got_grad = jax.value_and_grad(fast, has_aux=True)(params)
  (_, want), want_grad = jax.value_and_grad(slow, has_aux=True)(params)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(nnx.to_pure_dict(got_grad), nnx.to_pure_dict(want_grad), atol=1e-4, rtol=1e-4)
  # The setting matters: the reference without it (its fields at their defaults) on the same parameters differs.
  unset = {name: BASE.__dataclass_fields__[name].default for name in SETTINGS[setting]}
  if cfg.tie_embeddings:  # keep the tied head: the untied one has no parameters here
    unset.update(tie_embeddings=True, scale_tied_head=True)
  without = slow(params, dataclasses.replace(BASE, **unset))[1]
  assert float(jnp.max(jnp.abs(want - without))) > 1e-2, "the setting does not change the logits"
  assert built_param_count(cfg) == flops.param_count(cfg).total


def test_rope_frequencies_equal_the_transformers_formulas():
  """layers.Rope against reference.rope_frequencies (pair by pair in Python floats), llama3 on a table whose
  wavelengths fall in all three of its regimes (kept, interpolated, divided), longrope below and above its
  original length."""
  llama3 = dict(theta=5e5, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_len=64)
  wavelengths = 2 * np.pi / reference.rope_frequencies(64, 10, theta=5e5)[0]
  assert (wavelengths < 16).any() and ((wavelengths >= 16) & (wavelengths <= 64)).any() and (wavelengths > 64).any()
  longrope = dict(scaling="longrope", original_max_len=8, short_factor=tuple(np.linspace(1, 2, 32)),
                  long_factor=tuple(np.linspace(1, 30, 32)), short_mscale=1.2, long_mscale=1.4)
  for options, length in ((llama3, 10), (longrope, 8), (longrope, 9), ({}, 10), (dict(theta=1e6), 10)):
    got, got_mscale = layers.Rope(**options).frequencies(64, length)
    want, want_mscale = reference.rope_frequencies(64, length, **options)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)
    assert got_mscale == want_mscale


@pytest.mark.parametrize("cross", [False, True])
def test_unscaled_attention_of_the_encoder_decoder_equals_its_reference(cross):
  """T5/Switch attention (model.scale_attention=False, HF SwitchTransformers' scaling 1.0), self and cross."""
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    layer = layers.Attention(16, 2, 8, init_scale=1.0, causal=False, rotary=False, cross=cross, scale_logits=False,
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  context = jax.random.normal(jax.random.key(2), (2, 7, 16)) if cross else x
  wq, wk, wv = ((layer.q[...], *jnp.split(layer.kv[...], 2, axis=1)) if cross
                else jnp.split(layer.qkv[...], 3, axis=1))
  got = layer(x, context=context if cross else None)
  want = reference.attention_with_bias(x, context, wq, wk, wv, layer.out[...], None, None, False, scale_logits=False)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  scaled = reference.attention_with_bias(x, context, wq, wk, wv, layer.out[...], None, None, False)
  assert float(jnp.max(jnp.abs(want - scaled))) > 1e-2


def test_encoder_decoder_norms_take_the_kind_and_epsilon():
  cfg = dataclasses.replace(BASE, architecture="encoder_decoder", positions="relative", norm="layernorm_nobias",
                            norm_eps=1e-5, scale_attention=False, tie_embeddings=True)
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    model = nnx.eval_shape(lambda: encdec.EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
  assert len(norms) == 2 * cfg.num_layers + 1 + 3 * cfg.decoder_layers + 1
  assert all(n.epsilon == 1e-5 and n.bias is None and n.scale is not None for n in norms)
  count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == flops.param_count(cfg).total


def test_the_settings_build_and_run_sharded_on_the_8_device_mesh():
  """Every new parameter (biases, QK-norm scales, LM-head bias, LayerNorm bias) carries logical axes that the
  8-device mesh (data 2, fsdp 2, tensor 2) shards, and the sharded model computes the one-device logits."""
  cfg = dataclasses.replace(BASE, norm="layernorm", attention_bias="qkvo", qk_norm="full", clip_qkv=1.0,
                            lm_head_bias=True, vocab_size=40, **{k: v for k, v in LONGROPE.items()})
  graph, params, rest = perturbed_model(cfg)
  want, _ = nnx.merge(graph, params, rest)(TOKENS)
  mesh = parallel.create_mesh(2, 1, fsdp=2, tensor=2)
  with parallel.mesh_context(mesh):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    sharded = nnx.state(model, nnx.Param)
    assert sharded["blocks"][0]["attention"]["qkv_bias"][...].sharding.spec == parallel.logical_to_spec(
        ("heads", "kv"))
    placed = jax.tree.map(lambda p, s: jax.device_put(p, s.sharding), params, sharded)
    got, _ = jax.jit(lambda p: nnx.merge(graph, p, rest)(TOKENS))(placed)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


def test_rope_factor_tuples_survive_config_json_and_assignment():
  config = config_lib.default_config()
  config.model.update(dict(head_dim=8, **LONGROPE))
  config.model.rope_long_factor = [1.0, 2.0, 3.0, 4.0]  # a list assigned to a tuple field
  again = ml_collections.ConfigDict(config_lib.migrate(json.loads(json.dumps(config_lib.to_dict(config)))))
  for c in (config, again):
    model = config_lib.typed(c).model
    assert model.rope_short_factor == LONGROPE["rope_short_factor"]
    assert model.rope_long_factor == (1.0, 2.0, 3.0, 4.0)
    hash(model)  # the model config stays hashable (a static attribute of the modules)


@pytest.mark.parametrize("fields, message", [
    (dict(norm="batchnorm"), "model.norm='batchnorm' must be one of"),
    (dict(norm_eps=0.0), "model.norm_eps=0.0 must be > 0"),
    (dict(rope_theta=-1.0), "model.rope_theta=-1.0 must be > 0"),
    (dict(attention_bias="qk"), "model.attention_bias='qk' must be one of 'none', 'qkv', 'qkvo'"),
    (dict(qk_norm="layer"), "model.qk_norm='layer' must be one of 'none', 'per_head', 'full'"),
    (dict(clip_qkv=-1.0), r"model.clip_qkv=-1.0 must be >= 0"),
    (dict(norm_position="sandwich"), "model.norm_position='sandwich' must be one of 'pre', 'post'"),
    (dict(scale_tied_head=False), "model.scale_tied_head=False needs model.tie_embeddings=True"),
    (dict(rope_scaling="yarn"), "model.rope_scaling='yarn' must be one of 'none', 'llama3', 'longrope'"),
    (dict(rope_scaling="llama3"), "model.rope_original_max_len=0 must be > 0 for model.rope_scaling='llama3'"),
    (dict(rope_scaling="llama3", rope_original_max_len=8, rope_high_freq_factor=1.0),
     "model.rope_high_freq_factor=1.0 must be > model.rope_low_freq_factor=1.0"),
    (dict(LONGROPE, rope_long_factor=(1.0, 2.0)), "model.rope_long_factor has 2 entries; longrope needs head_dim"),
    (dict(rope_scaling_factor=4.0), "model.rope_scaling_factor=4.0 is not read with model.rope_scaling='none'"),
    (dict(LONGROPE, rope_low_freq_factor=2.0), "model.rope_low_freq_factor=2.0 is not read with "
     "model.rope_scaling='longrope'"),
    (dict(rope_short_factor=(0.0,)), r"model.rope_short_factor=\(0.0,\) must be a tuple of numbers each > 0"),
    (dict(architecture="encoder_decoder", positions="relative", rope_theta=1e6),
     "model.rope_theta=1000000.0 is not read with model.positions='relative'"),
    (dict(architecture="encoder_decoder", norm_position="post"), "model.norm_position='post' is for "
     "model.architecture='decoder'"),
    (dict(architecture="encoder_decoder", qk_norm="full"), "model.qk_norm='full' is for model.architecture="),
    (dict(architecture="encoder_decoder", attention_bias="qkv"), "model.attention_bias='qkv' is for"),
    (dict(architecture="encoder_decoder", clip_qkv=8.0), "model.clip_qkv=8.0 is for"),
    (dict(architecture="encoder_decoder", lm_head_bias=True), "model.lm_head_bias=True is for"),
])
def test_bad_architecture_settings_are_refused_naming_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **fields)
