"""Writes the parity fixtures of the checkpoint importer (issue 31) and of greedy decoding (issue 32, item 4).

What: for every Hugging Face family moe_jax imports, this builds a tiny random model with `transformers`' own classes
(float32, two blocks, d_model 32, vocabulary 96, several experts) and writes, under
`tests/fixtures/interop/<family>/`:

  config.json, generation_config.json, model.safetensors   exactly as `save_pretrained` writes them: the checkpoint
                                                           the importer reads (float32, the Hub's tensor names);
  reference.npz                                            what `transformers` computes from it (keys below);
  fixture.json                                             how it was made: class, versions, seed, the settings it
                                                           exercises, router scales and the measured margins.

reference.npz holds, with T = 2 x 12 tokens flattened row-major (batch-major, as the routers see them):
  input_ids [2, 12] int64, logits [2, 12, V] float32                 (encoder-decoder Switch: encoder_input_ids,
                                                                      decoder_input_ids, logits of the decoder);
  moe_layers [L] str                                                 module path of every MoE block, in call order;
  moe.{i}.router_logits [T, E] float32                               the router's logits (before any softmax);
  moe.{i}.topk_index [T, k] int64, moe.{i}.topk_weight [T, k] float32  the experts the block ran and their weights,
                                                                      as handed to its experts module;
  moe.{i}.kept [T] bool                                              Switch only: False where capacity dropped it;
  generate_prompt_ids [2, 6] int64 (Switch: encoder input [2, 12])  and generate_ids, the full output of
  generate_ids [2, 6 + 8] int64 (Switch: [2, 1 + 8] decoder ids)     `generate(do_sample=False, max_new_tokens=8)`
  generate_step_logits [8, 2, V] float32                             with EOS disabled, and the raw logits of each step.

Why: the parity tests of the importer must run without torch or a network, so the reference computation is frozen
here once. Random models hide bugs that real checkpoints would show, so the script makes them visible: every 1-D
parameter (norm weights, biases) is perturbed away from its 1 / 0 init, weights use initializer_range 0.1 so logits
are of order 1, each family sets its published architecture options (rotary base, QK-norm kind, biases, clip_qkv,
gated shared expert, longrope, capacity...) to values whose omission changes the logits, and each router is
rescaled so its logits have standard deviation ROUTER_LOGIT_STD on the reference input (softmax weights neither
uniform nor one-hot). Near-ties would make "same experts chosen" flaky, so a fixture is only accepted when the gap
between the k-th and (k+1)-th router logit of every routed token (reference forward and generation) is at least
MIN_ROUTER_MARGIN and the gap between the two largest output logits at every position and generation step is at
least MIN_LOGIT_MARGIN; settings that act through a threshold must act, away from it: clip_qkv clips between 1 % and
50 % of the entries, Phi-3.5-MoE's sparsemixer mask both keeps and drops experts beside the chosen one with every
decision at least MIN_SPARSEMIXER_MARGIN from its threshold, Switch's capacity drops tokens in every MoE layer.
Otherwise the next seed is tried (seeds are fixed, so the output is deterministic: a rerun rewrites identical
files).

How to run (from the repository root, with the `interop-dev` extra installed in its own venv; CPU is enough):
  python3 -m venv /tmp/venv-interop && /tmp/venv-interop/bin/pip install -e '.[interop-dev]'
  /tmp/venv-interop/bin/python tools/make_interop_fixtures.py [--families=mixtral,olmoe] [--out=DIR]
The script does not import moe_jax, so `pip install torch==2.13.0 transformers==5.25.0 safetensors` (the extra's
pins, without moe_jax's own dependencies) is enough. `pip install torch==2.13.0` takes the CPU wheel this machine
image carries; an unpinned torch pulls the CUDA build (GBs).
It reloads every written checkpoint with `from_pretrained` and checks that the logits are bitwise the reference,
then prints the size of every fixture and the total. tests/test_interop_fixtures.py checks the result without torch.
"""

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys

import numpy as np
import safetensors
import torch
import transformers

# Deterministic CPU math: one thread (a fixed reduction order) and deterministic kernels.
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "interop"

BATCH, SEQ = 2, 12  # reference input: 2 sequences of 12 tokens
PROMPT, NEW_TOKENS = 6, 8  # generation: 2 prompts of 6 tokens, 8 greedy tokens
VOCAB = 96
INIT_RANGE = 0.1  # weights' std: logits of order 1 (the default 0.02 gives logits of order 0.1)
NORM_AND_BIAS_STD = 0.1  # perturbation of every 1-D parameter (norm weights start at 1, biases at 0)
ROUTER_LOGIT_STD = 2.0  # router logits' std after rescaling: top-k weights between uniform and one-hot
MIN_ROUTER_MARGIN = 1e-2  # the k-th minus the (k+1)-th router logit, every token, every MoE layer
MIN_LOGIT_MARGIN = 1e-3  # largest minus second largest output logit, every position and generation step
MIN_SPARSEMIXER_MARGIN = 1e-3  # Phi-3.5-MoE: |relative gap - 2 eps| of every keep/drop decision (a ratio, unitless)
BASE_SEED, MAX_TRIES = 31, 100

# The Hub's configs store rope_theta (and rope_scaling) at the top level; transformers 5 writes them into
# `rope_parameters`. Both spell the same thing; the fixtures carry the form transformers 5 writes.
def rope(theta, **scaling):
  return {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": theta, **scaling}


COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=INIT_RANGE, max_position_embeddings=128)


@dataclasses.dataclass(frozen=True)
class Family:
  """One fixture: a transformers model class, its config, and what the fixture is meant to exercise."""
  model_class: str
  config_class: str
  config: dict
  settings: tuple  # the published architecture settings this fixture makes visible (written to README/fixture.json)
  top_k: int = 0  # experts per token (0: dense)
  clip_modules: tuple = ()  # module-name suffixes whose outputs clip_qkv clamps (to report how much is clipped)
  clip_qkv: float | None = None
  encoder_decoder: bool = False
  sparsemixer_eps: float | None = None  # Phi-3.5-MoE: the router_jitter_noise its sparsemixer thresholds with


FAMILIES = {
    "mixtral": Family(
        "MixtralForCausalLM", "MixtralConfig",
        dict(COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
             rope_parameters=rope(1e6), tie_word_embeddings=False, sliding_window=None),
        ("8 experts, top-2, softmax over all experts then top-k then renormalised (= softmax of the top-k logits)",
         "rope_theta 1e6", "GQA 4 query / 2 kv heads", "rms_norm_eps 1e-5", "untied LM head"),
        top_k=2),
    "olmoe": Family(
        "OlmoeForCausalLM", "OlmoeConfig",
        dict(COMMON, intermediate_size=16, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
             rms_norm_eps=1e-5, rope_parameters=rope(1e4), clip_qkv=None, tie_word_embeddings=False,
             pad_token_id=1, eos_token_id=95),
        ("16 experts, top-4, softmax then top-k, norm_topk_prob=False (weights do not sum to 1)",
         "QK-norm: RMSNorm over the whole projected q [H*D] and k [KV*D] (before the head split)",
         "rope_theta 1e4", "GQA 4 / 2", "untied LM head"),
        top_k=4),
    "qwen2_moe": Family(
        "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
        dict(COMMON, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=48,
             num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
             qkv_bias=True, rms_norm_eps=1e-6, rope_parameters=rope(1e6), use_sliding_window=False,
             tie_word_embeddings=False),
        ("8 experts, top-4, softmax then top-k, norm_topk_prob=False",
         "shared expert (ffn 48) gated by sigmoid(x . shared_expert_gate), added to the routed output",
         "q/k/v biases (no o_proj bias)", "rope_theta 1e6", "rms_norm_eps 1e-6", "untied LM head"),
        top_k=4),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
        dict(COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=16, num_experts=16,
             num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
             attention_bias=False, rms_norm_eps=1e-6, rope_parameters=rope(1e6), use_sliding_window=False,
             tie_word_embeddings=False),
        ("16 experts, top-4, softmax then top-k, norm_topk_prob=True",
         "QK-norm: RMSNorm per head over head_dim (after the head split)",
         "head_dim 16 != hidden_size / heads = 8 (q_proj 32 -> 64)", "rope_theta 1e6", "rms_norm_eps 1e-6",
         "untied LM head"),
        top_k=4),
    "dbrx": Family(
        "DbrxForCausalLM", "DbrxConfig",
        # transformers 5.25 builds DBRX's rotary table from the top-level rope_parameters and ignores
        # attn_config.rope_theta, the only place the Hub's DBRX config.json holds it; both are set to DBRX's 5e5.
        dict(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=128, initializer_range=INIT_RANGE,
             rope_parameters=rope(5e5), tie_word_embeddings=False,
             attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=5e5),
             ffn_config=dict(ffn_hidden_size=16, moe_num_experts=16, moe_top_k=4, moe_normalize_expert_weights=1.0,
                             moe_jitter_eps=0.01, ffn_act_fn={"name": "silu"})),
        ("16 experts, top-4, softmax then top-k, weights divided by their p-norm, p = moe_normalize_expert_weights = 1",
         "clip_qkv 1.0 on the fused Wqkv output (clips a fraction of entries, reported below)",
         "fused Wqkv [H*D + 2*KV*D, d]; experts fused as w1/v1/w2 [E*ffn, d] (w2 NOT transposed)",
         "LayerNorm without bias (eps 1e-5)", "rope_theta 5e5", "GQA 4 / 2", "untied LM head",
         "moe_jitter_eps 0.01 (training only: no effect here)"),
        top_k=4, clip_modules=("attn.Wqkv",), clip_qkv=1.0),
    "phimoe": Family(
        "PhimoeForCausalLM", "PhimoeConfig",
        dict(COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.1,
             input_jitter_noise=0.01, attention_bias=True, lm_head_bias=True, rms_norm_eps=1e-5,
             tie_word_embeddings=False, sliding_window=None, max_position_embeddings=131072,
             rope_parameters=rope(1e4, rope_type="longrope", short_factor=[1.0, 1.5, 3.0, 7.0],
                                  long_factor=[1.0, 2.0, 6.0, 20.0], short_mscale=1.243, long_mscale=1.243,
                                  original_max_position_embeddings=4096)),
        ("8 experts, top-2 by sparsemixer (eval path): argmax, then argmax of the rest; each weight is a softmax over "
         "the experts whose relative gap (max - s) / max(|s|, max) is <= 2 * router_jitter_noise; weights not "
         "renormalised",
         "router_jitter_noise 0.1 (published 0.01; larger so the sparsemixer mask keeps some experts)",
         "LayerNorm with bias (eps = rms_norm_eps 1e-5) for every norm",
         "biases on q/k/v/o and on the LM head", "longrope: short_factor divides inv_freq, cos/sin scaled by "
         "short_mscale 1.243 (sequences <= original_max_position_embeddings 4096)", "rope_theta 1e4", "GQA 4 / 2",
         "untied LM head"),
        top_k=2, sparsemixer_eps=0.1),
    "switch": Family(
        "SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig",
        dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
             num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=8, expert_capacity=3,
             router_bias=False, router_jitter_noise=0.01, router_dtype="float32", router_ignore_padding_tokens=False,
             relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
             layer_norm_epsilon=1e-6, dense_act_fn="relu", tie_word_embeddings=True, initializer_factor=1.0,
             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
        ("8 experts, top-1 (softmax, argmax; output scaled by the top probability, not renormalised)",
         "expert_capacity 3 per expert per sequence (12 tokens, 8 experts: capacity factor 2; switch-base-8 has "
         "64 x 8 / 512 = 1.0): tokens beyond capacity, in sequence order, are dropped (kept=False, output 0 + "
         "residual)",
         "every 2nd block sparse (block 1 of 2 in encoder and decoder), ReLU experts, no biases",
         "T5 attention: no 1/sqrt(d) scaling, relative position bias (32 buckets, max distance 128) from block 0 "
         "shared by all blocks, bidirectional in the encoder, causal in the decoder",
         "T5 RMSNorm (eps 1e-6)", "tied embeddings, decoder output scaled by d_model**-0.5 before the LM head",
         "router_jitter_noise 0.01 (training only: no effect here)"),
        top_k=1, encoder_decoder=True),
    "llama": Family(
        "LlamaForCausalLM", "LlamaConfig",
        dict(COMMON, intermediate_size=64, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
             tie_word_embeddings=True,
             rope_parameters=rope(5e5, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=16)),
        ("Llama 3.x rope: theta 5e5 with rope_type llama3 (factor 8, low 1, high 4; original_max_position_embeddings "
         "16 so that the scaling changes the rotations of 12-token inputs)", "tied embeddings", "GQA 4 / 2",
         "rms_norm_eps 1e-5")),
    "qwen2": Family(
        "Qwen2ForCausalLM", "Qwen2Config",
        dict(COMMON, intermediate_size=64, rms_norm_eps=1e-6, rope_parameters=rope(1e6), use_sliding_window=False,
             tie_word_embeddings=True),
        ("q/k/v biases (no o_proj bias)", "rope_theta 1e6", "rms_norm_eps 1e-6", "tied embeddings", "GQA 4 / 2")),
    "qwen3": Family(
        "Qwen3ForCausalLM", "Qwen3Config",
        dict(COMMON, head_dim=16, intermediate_size=64, rms_norm_eps=1e-6, rope_parameters=rope(1e6),
             attention_bias=False, use_sliding_window=False, tie_word_embeddings=True),
        ("QK-norm per head over head_dim", "head_dim 16 != hidden_size / heads = 8", "rope_theta 1e6",
         "rms_norm_eps 1e-6", "tied embeddings", "GQA 4 / 2")),
    "olmo": Family(
        "OlmoForCausalLM", "OlmoConfig",
        dict(COMMON, intermediate_size=64, rope_parameters=rope(1e4), clip_qkv=1.0, attention_bias=False,
             tie_word_embeddings=True, pad_token_id=1, eos_token_id=95),
        ("non-parametric LayerNorm (no weight, no bias, eps fixed at 1e-5 in the code)",
         "clip_qkv 1.0 on q, k, v after their projections (clips a fraction of entries, reported below)",
         "rope_theta 1e4", "tied embeddings", "GQA 4 / 2"),
        clip_modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), clip_qkv=1.0),
    "olmo2": Family(
        "Olmo2ForCausalLM", "Olmo2Config",
        dict(COMMON, intermediate_size=64, rms_norm_eps=1e-6, rope_parameters=rope(5e5), attention_bias=False,
             tie_word_embeddings=False, pad_token_id=1, eos_token_id=95),
        ("post-norm blocks: x + RMSNorm(attn(x)), x + RMSNorm(mlp(x)) (no pre-norm)",
         "QK-norm: RMSNorm over the whole projected q and k", "rope_theta 5e5", "rms_norm_eps 1e-6",
         "untied LM head", "GQA 4 / 2")),
}


def perturb_vectors(model, generator):
  """Moves every 1-D parameter (norm scales, biases) off its 1 / 0 init, so a misplaced one changes the logits."""
  with torch.no_grad():
    for param in model.parameters():
      if param.dim() == 1:
        param.add_(NORM_AND_BIAS_STD * torch.randn(param.shape, generator=generator))


def modules_named(model, suffix):
  return [(name, module) for name, module in model.named_modules() if type(module).__name__.endswith(suffix)]


class RouterRecorder:
  """Hooks every router (logits) and every experts module (the top-k indices and weights it is handed).

  The families differ in what their router returns, so the experts module's inputs are the common ground: all of
  them call `experts(hidden_states, top_k_index, top_k_weights)` (Switch: a one-hot dispatch mask and the top
  probability instead)."""

  def __init__(self, model):
    self.logits, self.choices = {}, {}
    self.handles = []
    for name, module in modules_named(model, "Router"):
      self.handles.append(module.register_forward_hook(self._on_router(name.rsplit(".", 1)[0])))
    for name, module in modules_named(model, "Experts"):
      self.handles.append(module.register_forward_pre_hook(self._on_experts(name.rsplit(".", 1)[0]),
                                                           with_kwargs=True))

  def _on_router(self, block):
    def hook(module, args, output):
      if isinstance(output, torch.Tensor):
        logits = output  # DbrxRouter
      elif type(module).__name__ == "SwitchTransformersTop1Router":
        logits = output[2]  # (dispatch mask, top probability, logits)
      else:
        logits = output[0]  # (logits, weights, indices)
      self.logits.setdefault(block, []).append(logits.detach().reshape(-1, logits.shape[-1]).clone())
    return hook

  def _on_experts(self, block):
    def hook(module, args, kwargs):
      _, index, weight = (list(args) + list(kwargs.values()))[:3]
      self.choices.setdefault(block, []).append((index.detach().clone(), weight.detach().clone()))
    return hook

  def reset(self):
    self.logits, self.choices = {}, {}

  def remove(self):
    for handle in self.handles:
      handle.remove()


class ClipRecorder:
  """Counts the entries that clip_qkv clamps, on the outputs of the projections it applies to."""

  def __init__(self, model, suffixes, clip):
    self.clipped = self.total = 0
    self.handles = [module.register_forward_hook(self._hook(clip)) for name, module in model.named_modules()
                    if clip is not None and name.endswith(suffixes)]

  def _hook(self, clip):
    def hook(module, args, output):
      self.clipped += int((output.abs() > clip).sum())
      self.total += output.numel()
    return hook

  def fraction(self):
    return self.clipped / max(self.total, 1)

  def remove(self):
    for handle in self.handles:
      handle.remove()


def router_margins(logits, k):
  """The k-th minus the (k+1)-th largest logit of every token: how far each top-k choice is from a tie."""
  top = torch.topk(logits, k + 1, dim=-1).values
  return top[:, k - 1] - top[:, k]


def sparsemixer_threshold_margin(logits, eps):
  """Phi-3.5-MoE's sparsemixer keeps expert s beside the chosen one when (max - s) / max(|s|, max) <= 2 eps.

  Returns the smallest |ratio - 2 eps| over both stages and every token: how far each keep/drop decision is from its
  threshold, and the fraction of (token, stage) softmaxes that keep more than the chosen expert."""
  distances, mixed = [], []
  scores = logits
  for _ in range(2):
    best, best_index = scores.max(dim=-1, keepdim=True)
    ratio = (best - scores) / logits.abs().clamp(min=best)
    others = torch.isfinite(scores) & (torch.arange(scores.shape[-1]) != best_index)
    distances.append((ratio - 2 * eps).abs()[others])
    mixed.append(((ratio <= 2 * eps) & others).any(dim=-1).float())
    scores = scores.scatter(-1, best_index, float("-inf"))
  return float(torch.cat(distances).min()), float(torch.cat(mixed).mean())


def output_margins(logits):
  top = torch.topk(logits.reshape(-1, logits.shape[-1]), 2, dim=-1).values
  return top[:, 0] - top[:, 1]


def scale_routers(model, run_forward):
  """Rescales each router so its logits have std ROUTER_LOGIT_STD on the reference input; returns the factors.

  Layer by layer, because a router's scale changes the inputs of the layers after it."""
  factors = {}
  for name, module in modules_named(model, "Router"):
    recorder = RouterRecorder(model)
    with torch.no_grad():
      run_forward()
    recorder.remove()
    block = name.rsplit(".", 1)[0]
    factor = ROUTER_LOGIT_STD / float(torch.cat(recorder.logits[block]).std())
    with torch.no_grad():
      for param in module.parameters():
        param.mul_(factor)
    factors[block] = factor
  return factors


def build(family, seed):
  """The model of `family` at `seed`, routers rescaled, in eval mode (dropout and jitter off)."""
  torch.manual_seed(seed)
  config = getattr(transformers, family.config_class)(**family.config)
  model = getattr(transformers, family.model_class)._from_config(
      config, attn_implementation="eager", dtype=torch.float32).eval()
  perturb_vectors(model, torch.Generator().manual_seed(seed))
  return model


def make_inputs(family, seed):
  rng = np.random.default_rng(seed)
  # Token 0 is Switch's decoder start and pad; plain ids elsewhere, so no special-token behaviour is involved.
  ids = rng.integers(2, VOCAB - 1, size=(BATCH, SEQ), dtype=np.int64)
  inputs = {"input_ids": ids}
  if family.encoder_decoder:
    decoder = rng.integers(2, VOCAB - 1, size=(BATCH, SEQ), dtype=np.int64)
    decoder[:, 0] = family.config["decoder_start_token_id"]
    inputs = {"encoder_input_ids": ids, "decoder_input_ids": decoder}
  prompt = rng.integers(2, VOCAB - 1, size=(BATCH, SEQ if family.encoder_decoder else PROMPT), dtype=np.int64)
  return inputs, prompt


def forward(model, family, inputs):
  if family.encoder_decoder:
    return model(input_ids=torch.from_numpy(inputs["encoder_input_ids"]),
                 decoder_input_ids=torch.from_numpy(inputs["decoder_input_ids"])).logits
  return model(input_ids=torch.from_numpy(inputs["input_ids"])).logits


def generate(model, prompt):
  """Greedy continuation with EOS disabled, so every sequence gets all NEW_TOKENS tokens (argmax at each step)."""
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=0,
                                         eos_token_id=None, pad_token_id=0,
                                         decoder_start_token_id=model.config.decoder_start_token_id
                                         if model.config.is_encoder_decoder else None,
                                         output_logits=True, return_dict_in_generate=True)
  out = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                       generation_config=config)
  return out.sequences, torch.stack(out.logits)


def moe_records(recorder, family):
  """Per MoE block, in call order: router logits, top-k indices and weights (Switch: and the kept mask)."""
  records = []
  for block, logits in recorder.logits.items():
    (index, weight), = recorder.choices[block]
    logits, = logits
    entry = {"router_logits": logits.float().numpy()}
    if family.encoder_decoder:  # index: one-hot dispatch mask [T, 1, E], zero where the token was dropped
      entry["topk_index"] = logits.argmax(-1, keepdim=True).numpy()
      entry["topk_weight"] = weight.reshape(-1, 1).float().numpy()
      entry["kept"] = index.reshape(index.shape[0], -1).sum(-1).bool().numpy()
    else:
      entry["topk_index"] = index.reshape(-1, family.top_k).numpy()
      entry["topk_weight"] = weight.reshape(-1, family.top_k).float().numpy()
    records.append((block, entry))
  return records


def attempt(family, seed):
  """Builds, measures and returns (model, arrays, stats); stats["accepted"] says whether the margins hold."""
  model = build(family, seed)
  inputs, prompt = make_inputs(family, seed)
  factors = scale_routers(model, lambda: forward(model, family, inputs)) if family.top_k else {}

  recorder = RouterRecorder(model)
  clips = ClipRecorder(model, family.clip_modules, family.clip_qkv)
  with torch.no_grad():
    logits = forward(model, family, inputs)
  records = moe_records(recorder, family)
  clipped_fraction = clips.fraction()
  clips.remove()

  recorder.reset()
  with torch.no_grad():
    generated, step_logits = generate(model, prompt)
  generate_router_logits = [torch.cat(chunks) for chunks in recorder.logits.values()]
  recorder.remove()

  stats = {"seed": seed, "logit_margin_min": float(output_margins(logits).min()),
           "generate_logit_margin_min": float(output_margins(step_logits).min())}
  accepted = (stats["logit_margin_min"] >= MIN_LOGIT_MARGIN
              and stats["generate_logit_margin_min"] >= MIN_LOGIT_MARGIN)
  if family.top_k:
    k = family.top_k
    stats["router_scale"] = {block: round(factor, 6) for block, factor in factors.items()}
    stats["router_margin_min"] = min(float(router_margins(torch.from_numpy(e["router_logits"]), k).min())
                                     for _, e in records)
    stats["generate_router_margin_min"] = min(float(router_margins(l, k).min()) for l in generate_router_logits)
    accepted &= min(stats["router_margin_min"], stats["generate_router_margin_min"]) >= MIN_ROUTER_MARGIN
    stats["router_logit_std"] = ROUTER_LOGIT_STD
  if family.sparsemixer_eps is not None:
    distance, mixed = zip(*[sparsemixer_threshold_margin(l, family.sparsemixer_eps)
                            for l in [torch.from_numpy(e["router_logits"]) for _, e in records]
                            + generate_router_logits])
    stats["sparsemixer_threshold_margin_min"] = min(distance)
    stats["sparsemixer_mixed_fraction"] = round(float(np.mean(mixed[:len(records)])), 4)
    # Both behaviours of the mask (experts kept beside the chosen one, and not) must occur, away from the threshold.
    accepted &= (stats["sparsemixer_threshold_margin_min"] >= MIN_SPARSEMIXER_MARGIN
                 and 0 < min(mixed) and max(mixed) < 1)
  if family.clip_qkv is not None:
    stats["clipped_fraction"] = round(clipped_fraction, 4)
    accepted &= 0.01 < clipped_fraction < 0.5  # clipping must matter, without dominating
  if family.encoder_decoder:
    stats["dropped_tokens"] = {block: int((~e["kept"]).sum()) for block, e in records}
    accepted &= all(n > 0 for n in stats["dropped_tokens"].values())  # capacity must be exercised

  arrays = {k: v for k, v in inputs.items()}
  arrays["logits"] = logits.float().numpy()
  arrays["moe_layers"] = np.array([block for block, _ in records], dtype=str)
  for i, (_, entry) in enumerate(records):
    for key, value in entry.items():
      arrays[f"moe.{i}.{key}"] = value
  arrays["generate_prompt_ids"] = prompt
  arrays["generate_ids"] = generated.numpy()
  arrays["generate_step_logits"] = step_logits.float().numpy()
  stats["accepted"] = bool(accepted)
  return model, arrays, stats


def write_fixture(name, family, out_root):
  for seed in range(BASE_SEED, BASE_SEED + MAX_TRIES):
    model, arrays, stats = attempt(family, seed)
    if stats["accepted"]:
      break
    print(f"  {name}: seed {seed} rejected {json.dumps(stats)}", flush=True)
  else:
    raise RuntimeError(f"{name}: no seed in {MAX_TRIES} tries meets the margins")

  out = out_root / name
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out)
  # The written checkpoint is the fixture: reloading it must reproduce the reference bitwise.
  reloaded = getattr(transformers, family.model_class).from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    inputs = {k: arrays[k] for k in ("input_ids", "encoder_input_ids", "decoder_input_ids") if k in arrays}
    again = forward(reloaded, family, inputs).numpy()
  if not np.array_equal(again, arrays["logits"]):
    raise RuntimeError(f"{name}: the reloaded checkpoint does not reproduce the reference logits")
  np.savez_compressed(out / "reference.npz", **arrays)
  del stats["accepted"]
  meta = {"family": name, "model_class": family.model_class, "config_class": family.config_class,
          "torch": torch.__version__, "transformers": transformers.__version__,
          "safetensors": safetensors.__version__, "settings": list(family.settings), "top_k": family.top_k,
          "thresholds": {"min_router_margin": MIN_ROUTER_MARGIN, "min_logit_margin": MIN_LOGIT_MARGIN,
                         "min_sparsemixer_margin": MIN_SPARSEMIXER_MARGIN},
          **stats}
  (out / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
  return meta


README_HEAD = """# Interop parity fixtures

Tiny random models built with `transformers`' own classes, saved with `save_pretrained` (float32), and what
`transformers` computes from them. The importer of issue 31 must reproduce `logits` (max abs error 1e-4, same argmax)
and every MoE layer's chosen experts; the greedy decoder of issue 32 must reproduce `generate_ids`.
The tensor names, config fields and routing math of each family: docs/interop_fixtures.md.

Made with torch {torch}, transformers {transformers}, safetensors {safetensors} (CPU, float32, eager attention).
Regenerate (deterministic; seeds fixed) from the repository root, in a venv with the `interop-dev` extra:

    python3 -m venv /tmp/venv-interop && /tmp/venv-interop/bin/pip install -e '.[interop-dev]'
    /tmp/venv-interop/bin/python tools/make_interop_fixtures.py

(`pip install torch=={torch_pin} transformers=={transformers} safetensors` instead of the extra skips moe_jax's own
dependencies; the script does not import moe_jax.)

Each `<family>/` holds `config.json`, `generation_config.json` and `model.safetensors` (as written by
`save_pretrained`), `reference.npz` (keys in the docstring of tools/make_interop_fixtures.py) and `fixture.json`
(seed, router scales, measured margins). Common to all: vocabulary {vocab}, d_model 32, 2 blocks (Switch: 2 encoder +
2 decoder), weights' std {init}, every norm weight and bias perturbed by N(0, {pert}), reference input
{batch} x {seq} tokens, greedy generation of {new} tokens from {batch} prompts of {prompt} tokens (Switch: encoder
inputs of {seq} tokens) with EOS disabled. Routers are rescaled to logits of std {rstd}; a fixture is kept only when
every top-k choice is at least {rmargin} (router logit units) from a tie and every argmax at least {lmargin}.

| family | transformers class | settings exercised | margins (router / argmax) |
|---|---|---|---|
"""


def write_readme(out_root, metas):
  first = next(iter(metas.values()))
  text = README_HEAD.format(torch=first["torch"], torch_pin=first["torch"].split("+")[0],
                            transformers=first["transformers"],
                            safetensors=first["safetensors"], vocab=VOCAB, init=INIT_RANGE, pert=NORM_AND_BIAS_STD,
                            batch=BATCH, seq=SEQ, new=NEW_TOKENS, prompt=PROMPT, rstd=ROUTER_LOGIT_STD,
                            rmargin=MIN_ROUTER_MARGIN, lmargin=MIN_LOGIT_MARGIN)
  for name, meta in metas.items():
    settings = "; ".join(meta["settings"])
    measured = ("clipped_fraction", "dropped_tokens", "sparsemixer_mixed_fraction", "sparsemixer_threshold_margin_min")
    extras = [f"{key} {meta[key]:.3g}" if isinstance(meta[key], float) else f"{key} {meta[key]}"
              for key in measured if key in meta]
    if extras:
      settings += " (measured: " + ", ".join(extras) + ")"
    router = (f"{min(meta['router_margin_min'], meta['generate_router_margin_min']):.3g}"
              if meta["top_k"] else "dense")
    argmax = min(meta["logit_margin_min"], meta["generate_logit_margin_min"])
    text += f"| `{name}` | `{meta['model_class']}` | {settings} | {router} / {argmax:.3g} |\n"
  (out_root / "README.md").write_text(text)


def directory_bytes(path):
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--families", default=",".join(FAMILIES),
                      help="comma-separated subset of: " + ", ".join(FAMILIES))
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args()
  names = args.families.split(",")
  unknown = [n for n in names if n not in FAMILIES]
  if unknown:
    parser.error(f"unknown families {unknown}")
  args.out.mkdir(parents=True, exist_ok=True)

  metas = {}
  for name in FAMILIES:  # the README lists every family already written, in this order
    fixture = args.out / name / "fixture.json"
    if name in names:
      missing = [c for c in (FAMILIES[name].model_class, FAMILIES[name].config_class) if not hasattr(transformers, c)]
      if missing:
        print(f"{name}: skipped, transformers {transformers.__version__} has no {missing}", flush=True)
        continue
      metas[name] = write_fixture(name, FAMILIES[name], args.out)
      print(f"{name}: seed {metas[name]['seed']}, {directory_bytes(args.out / name) / 1e6:.3f} MB", flush=True)
    elif fixture.exists():
      metas[name] = json.loads(fixture.read_text())
  write_readme(args.out, metas)
  print(f"total {directory_bytes(args.out) / 1e6:.3f} MB in {args.out}")


if __name__ == "__main__":
  sys.exit(main())
