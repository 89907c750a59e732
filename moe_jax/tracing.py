"""Router traces of a model: what every MoE layer routed, token by token, over a text (an `analysis.Trace`).

Axis legend: B batch · L sequence length · G groups · S tokens per group · K choices per token · E experts ·
P slots per expert · N traced tokens · NB MoE blocks.

How the routing gets out. The MoE layer returns aggregates only (`moe_layer.MoeAux`). With its static flag
`capture_routing` set, `MoeFeedForward` sows its evaluation routing (`MoeFeedForward.route`: the same router family
call on the same router arrays and inputs as its forward pass) as an `nnx.Intermediate`, which `nnx.capture` collects;
`capture_routing` sets the flag for one forward pass and returns every MoE block's routing by block index (the keys
of `LmAux.blocks`: decoder LM block i; encoder block i and decoder block j as num_layers + j).

What each router family records (`token_choices`):
  * token choice (switch, top_k, base at evaluation, hash): its K choices in the router's order, best first; every
    choice selected, kept where capacity left room; gates are the combine weights;
  * expert choice (Zhou et al. 2022): the experts choose the tokens, so a token has 0 to E experts. Recorded as K = E
    choices, the experts that picked the token first (by gate, descending), selected = kept = picked; a token no
    expert picked is "dropped";
  * Soft MoE (Puigcerver et al. 2023): every token reaches every expert through the slots. Recorded as K = E choices,
    every expert selected and kept, the gate of expert e the token's combine weight summed over e's P slots (the
    share of its output from e; it sums to 1), experts by that weight, descending, and the entropy of that
    distribution as its router entropy. Set analyses (load, saturation, co-activation) then count every expert for
    every token; read its first choice (`expert_index[..., 0]`) for an argmax routing.
Router entropy elsewhere is that of the router's softmax over experts (`RoutingResult.router_probs`).

Tracing a text (`trace_eval_set`): the rows of a fixed evaluation set (`moe_jax.evalset`: every row holds one
document's tokens; padding has document -1), batch by batch, deterministic. An encoder-decoder reads each row both as
its encoder input and as its decoder input, so every token has a routing in every encoder and decoder MoE block.
Memory is bounded by `max_tokens` (the arrays are allocated once for the rows traced).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import analysis, evalset, routing
from moe_jax.encdec import EncoderDecoder
from moe_jax.model import TransformerLM
from moe_jax.moe_layer import ForcedRouting, MoeFeedForward

Routing = routing.RoutingResult | routing.SoftRoutingResult


def moe_layers(model: nnx.Module) -> dict[int, MoeFeedForward]:
  """Every MoE layer of a decoder LM or encoder-decoder by block index (as `LmAux.blocks`). A scanned model
  (`model.scan_layers`) is refused: trace its unscanned twin (`model.scanned_to_blocks` converts the state)."""
  if isinstance(model, TransformerLM):
    if model.config.scan_layers:
      raise ValueError("model.scan_layers=True: trace the unscanned model (model.scanned_to_blocks converts its state)")
    return {i: block.ffn for i, block in enumerate(model.blocks) if block.use_moe}
  if isinstance(model, EncoderDecoder):
    layers = {i: block.ffn for i, block in enumerate(model.encoder) if block.use_moe}
    offset = model.config.num_layers
    return {**layers, **{offset + j: block.ffn for j, block in enumerate(model.decoder) if block.use_moe}}
  raise ValueError(f"cannot trace a {type(model).__name__}: a TransformerLM or an EncoderDecoder")


def _batch_args(model: nnx.Module, inputs: jax.Array) -> tuple[jax.Array, ...]:
  """The model's positional inputs for tokens [B, L]: the encoder-decoder reads them in both stacks."""
  return (inputs, inputs) if isinstance(model, EncoderDecoder) else (inputs,)


@nnx.jit
def _captured_forward(model: nnx.Module, *inputs: jax.Array):
  return nnx.capture(lambda m, *x: m(*x, deterministic=True), nnx.Intermediate)(model, *inputs)


def capture_routing(model: nnx.Module, inputs: jax.Array) -> tuple[jax.Array, dict[int, Routing]]:
  """(logits [B, L, V], block index -> that MoE layer's routing of `inputs` [B, L] int32) of one deterministic
  forward pass. The flag is set on the model's MoE layers for this call only."""
  layers = moe_layers(model)
  try:
    for layer in layers.values():
      layer.capture_routing = True
    (logits, _), captured = _captured_forward(model, *_batch_args(model, inputs))
  finally:
    for layer in layers.values():
      layer.capture_routing = False
  paths = {id(layer): path for path, layer in nnx.iter_graph(model) if isinstance(layer, MoeFeedForward)}
  out = {}
  for index, layer in layers.items():
    node = captured
    for key in paths[id(layer)]:
      node = node[key]
    (out[index],) = node["routing"]  # one call per forward pass: a tuple of one
  return logits, out


def token_choices(route: Routing, *, experts_choose: bool) -> dict[str, np.ndarray]:
  """One layer's routing as per-token arrays (module docstring), tokens in the order of the flattened batch [B * L]
  (routing groups tile it in order): expert_index int16, gate float32, selected, kept bool [B * L, K]; entropy
  float32 [B * L]. `experts_choose`: the family is expert choice (its K = E choices are the experts that picked the
  token)."""
  if isinstance(route, routing.SoftRoutingResult):
    mass = np.asarray(route.combine_weight, np.float32).sum(axis=-1)  # [G, S, E]
    mass = mass.reshape(-1, mass.shape[-1])
    order = np.argsort(-mass, axis=-1, kind="stable")
    gate = np.take_along_axis(mass, order, axis=-1)
    every = np.ones(order.shape, bool)
    return {"expert_index": order.astype(np.int16), "gate": gate, "slot": np.zeros(order.shape, np.int16),
            "selected": every, "kept": every, "entropy": _entropy(mass)}
  k = route.expert_index.shape[-1]
  index = np.asarray(route.expert_index).reshape(-1, k)
  gate = np.asarray(route.combine_weight, np.float32).reshape(-1, k)
  slot = np.asarray(route.slot).reshape(-1, k)
  kept = np.asarray(route.kept).reshape(-1, k)
  selected = kept if experts_choose else np.ones_like(kept)
  if experts_choose:  # the experts that picked the token first, by gate
    order = np.lexsort((-gate, ~kept), axis=-1)
    index, gate, slot, kept, selected = (np.take_along_axis(a, order, axis=-1)
                                         for a in (index, gate, slot, kept, selected))
  probs = np.asarray(route.router_probs, np.float32)
  return {"expert_index": index.astype(np.int16), "gate": gate, "slot": slot.astype(np.int16), "selected": selected,
          "kept": kept, "entropy": _entropy(probs.reshape(-1, probs.shape[-1]))}


def choices_of(layer: MoeFeedForward) -> int:
  """K of the layer's `token_choices`: its router's choices per token (E for expert choice and Soft MoE)."""
  spec = jax.ShapeDtypeStruct((1, 1, layer.d_model), layer.dtype)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32) if layer.config.needs_token_ids else None
  route = jax.eval_shape(layer.route, spec, ids)
  return layer.config.num_experts if isinstance(route, routing.SoftRoutingResult) else route.expert_index.shape[-1]


def _entropy(p: np.ndarray) -> np.ndarray:  # [N, E] -> float32 [N]: -sum_e p_e log p_e, nats
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1).astype(np.float32)


def routing_record(model: nnx.Module, inputs: jax.Array) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(blocks int32 [NB], per-token arrays [B * L, NB, K] / [B * L, NB]) of one batch: `token_choices` of every
  MoE block stacked on the block axis, K the most choices of any block (the others padded: not selected)."""
  _, routes = capture_routing(model, inputs)
  layers = moe_layers(model)
  per_block = {b: token_choices(r, experts_choose=layers[b].config.router == "expert_choice")
               for b, r in sorted(routes.items())}
  k = max(c["expert_index"].shape[-1] for c in per_block.values())
  pad = lambda a: np.pad(a, [(0, 0), (0, k - a.shape[-1])])  # noqa: E731  zeros: expert 0, gate 0, False
  stacked = {name: np.stack([pad(c[name]) for c in per_block.values()], axis=1)
             for name in ("expert_index", "gate", "slot", "selected", "kept")}
  stacked["entropy"] = np.stack([c["entropy"] for c in per_block.values()], axis=1)
  return np.asarray(sorted(per_block), np.int32), stacked


def trace_eval_set(model: nnx.Module, eval_set: evalset.EvalSet, *, batch_size: int,
                   document_labels: Sequence[str], label_names: Sequence[str] = analysis.SOURCE_LABELS,
                   max_tokens: int | None = None, meta: Mapping[str, Any] | None = None,
                   progress: Callable[[int, int], Any] | None = None) -> analysis.Trace:
  """The `analysis.Trace` of `model` over the rows of `eval_set` (their inputs), at most `max_tokens` tokens (whole
  rows, the first ones). `document_labels` [D]: each of `eval_set.names`'s label, one of `label_names`.
  `progress(rows, total)` is called after each batch with the rows it traced and the rows to trace (a progress bar)."""
  if len(document_labels) != len(eval_set.names):
    raise ValueError(f"document_labels must name one label per document ({len(eval_set.names)}); got "
                     f"{len(document_labels)}")
  seq_len = eval_set.inputs.shape[1]
  rows = rows_to_trace(max_tokens, seq_len, len(eval_set.inputs))
  layers = moe_layers(model)
  if not layers:
    raise ValueError("the model has no MoE layer to trace")
  arrays: dict[str, np.ndarray] = {}
  blocks = None
  for start, batch in zip(range(0, rows, batch_size), _batches(eval_set, batch_size, rows)):
    count = min(batch_size, rows - start)
    blocks, record = routing_record(model, jnp.asarray(batch["inputs"]))
    tokens = slice(start * seq_len, (start + count) * seq_len)
    for name, value in record.items():
      if name not in arrays:  # allocated once, for every traced row
        arrays[name] = np.zeros((rows * seq_len, *value.shape[1:]), value.dtype)
      arrays[name][tokens] = value[:count * seq_len]
    if progress is not None:
      progress(count, rows)
  label_index = {name: i for i, name in enumerate(label_names)}
  unknown = sorted(set(document_labels) - set(label_index))
  if unknown:
    raise ValueError(f"document labels {unknown} are not among label_names {tuple(label_names)}")
  first = next(iter(layers.values())).config
  trace = analysis.Trace(
      token_ids=eval_set.inputs[:rows].reshape(-1).astype(np.int32),
      document=eval_set.document[:rows].reshape(-1).astype(np.int32),
      blocks=blocks, document_names=tuple(eval_set.names),
      document_labels=np.asarray([label_index[label] for label in document_labels], np.int8),
      label_names=tuple(label_names),
      meta={"num_experts": first.num_experts, "routers": [layers[b].config.router for b in blocks.tolist()],
            "choices": [choices_of(layers[b]) for b in blocks.tolist()],
            "seq_len": seq_len, "batch_size": batch_size, "eval_set": eval_set.fingerprint,
            **(meta or {})},
      **arrays)
  analysis.check_trace(trace)
  return trace


def _batches(eval_set: evalset.EvalSet, batch_size: int, rows: int):
  """`evalset.eval_batches` of the set's first `rows` rows (static shapes: the last batch padded, weight 0)."""
  for window, batch in evalset.eval_batches(eval_set, batch_size):
    if window.start >= rows:
      return
    batch["weights"][max(0, rows - window.start):] = 0.0  # rows past the first `rows` weigh nothing
    yield batch


def read_text_files(pattern: str) -> dict[str, str]:
  """name -> text of every file matching the glob `pattern` ('**' recurses), named by its path relative to the
  files' common directory (the name `analysis.source_label` reads); undecodable bytes replaced, as the corpus
  builders do. ValueError when nothing matches."""
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ValueError(f"--text_glob={pattern!r} matches no file")
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  texts = {}
  for path in paths:
    with open(path, "rb") as f:
      texts[os.path.relpath(os.path.abspath(path), root)] = f.read().decode("utf-8", errors="replace")
  return texts


def trace_documents(model: nnx.Module, documents: Mapping[str, np.ndarray], *, tokenizer: Any, seq_len: int,
                    cap_tokens: int, batch_size: int, max_tokens: int | None = None,
                    meta: Mapping[str, Any] | None = None, progress: Callable[[int, int], Any] | None = None
                    ) -> analysis.Trace:
  """The trace of `model` over `documents` (name -> int32 [T] token ids): their fixed evaluation set
  (`evalset.build_eval_set`: every document enters, at most `cap_tokens` of it, in rows of `seq_len`), each
  document labelled by its path (`analysis.source_label`)."""
  eval_set = evalset.build_eval_set(documents, tokenizer=tokenizer, seq_len=seq_len, cap_tokens=cap_tokens,
                                    min_tokens=0)
  return trace_eval_set(model, eval_set, batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                        document_labels=[analysis.source_label(name) for name in eval_set.names],
                        meta={"cap_tokens": cap_tokens, **(meta or {})})


def rows_to_trace(max_tokens: int | None, seq_len: int, total_rows: int) -> int:
  """Rows `trace_eval_set` traces: all, or the first max_tokens // seq_len (at least one)."""
  return total_rows if max_tokens is None else min(total_rows, max(1, max_tokens // seq_len))


# ----------------------------------------------------------------------------------------------------------
# Router replay and expert ablation.

REPLAYED = ("expert_index", "slot", "combine_weight", "kept")  # the RoutingResult fields a replay forces


@nnx.jit
def _forward(model: nnx.Module, *inputs: jax.Array):
  return model(*inputs, deterministic=True)


def replay(model: nnx.Module, inputs: jax.Array, forced: Mapping[int, Mapping[str, np.ndarray]]):
  """(logits [B, L, V], LmAux) of a deterministic forward pass of `inputs` [B, L] in which MoE block b routes as
  `forced[b]` says instead of as its router would: expert_index, slot, combine_weight, kept [B * L, K] (K the
  layer's choices, `choices_of`; tokens in the order of the flattened batch), e.g. `forced_from_trace`; the other
  blocks route themselves. Forcing a block's own routing changes nothing (the trace of a model replays to the same
  logits); forcing another model's compares two models on identical routing. Under a mesh each device replays the
  routing of its own routing groups (`MoeFeedForward` splits the forced arrays along G with the groups). Soft MoE
  has no discrete routing to force (ValueError)."""
  layers = moe_layers(model)
  try:
    for block, arrays in forced.items():
      layer = layers[block]
      if layer.config.router == "soft_moe":
        raise ValueError(f"block {block} routes with Soft MoE: its dense slot weights have no choices to replay")
      batch, length = inputs.shape
      size = layer.config.group_size or length
      k = choices_of(layer)
      shape = (batch * length // size, size, k)
      dtypes = {"expert_index": jnp.int32, "slot": jnp.int32, "combine_weight": jnp.float32, "kept": jnp.bool_}
      if any(np.shape(arrays[name]) != (batch * length, k) for name in REPLAYED):
        raise ValueError(f"forced routing of block {block} must be [B * L = {batch * length}, K = {k}] per field; "
                         f"got {({name: np.shape(arrays[name]) for name in REPLAYED})}")
      layer.forced_routing = ForcedRouting(
          {name: jnp.asarray(arrays[name], dtypes[name]).reshape(shape) for name in REPLAYED})
    return _forward(model, *_batch_args(model, inputs))
  finally:
    for layer in layers.values():
      layer.forced_routing = None


def forced_from_trace(trace: analysis.Trace, tokens: slice) -> dict[int, dict[str, np.ndarray]]:
  """`replay`'s forced routing of every traced block for the trace's tokens `tokens` (whole rows: a batch of rows
  start * L to stop * L): the recorded choices, slots, gates and kept flags, each block's first K (meta 'choices')."""
  forced = {}
  for i, block in enumerate(trace.blocks.tolist()):
    k = trace.meta["choices"][i]
    forced[block] = {"expert_index": trace.expert_index[tokens, i, :k], "slot": trace.slot[tokens, i, :k],
                     "combine_weight": trace.gate[tokens, i, :k], "kept": trace.kept[tokens, i, :k]}
  return forced


# How `ablation_losses` removes an expert: its tokens keep only their other choices ("residual": only the residual
# where it was their one choice), or go to their next choice ("next_choice").
REMOVALS = ("residual", "next_choice")


def without_expert(forced: Mapping[str, np.ndarray], expert: int) -> dict[str, np.ndarray]:
  """One block's forced routing with `expert` removed: its assignments dropped (kept False, weight 0), so its
  tokens keep their other choices, or only the residual when it was their only one."""
  kept = np.asarray(forced["kept"]) & (np.asarray(forced["expert_index"]) != expert)
  return {**forced, "kept": kept, "combine_weight": np.where(kept, forced["combine_weight"], 0.0)}


def next_choice(route: routing.RoutingResult, expert: int) -> dict[str, np.ndarray]:
  """One block's routing [G, S, K] with `expert` removed and its tokens sent to their next choice: a choice of
  `expert` becomes the token's most probable expert (`router_probs`) among those it did not choose, the choices
  are re-ordered by probability and the capacity slots re-claimed in the router's order
  (`routing.token_choice_slots`: first choices before second ones, tokens by position), so the other experts'
  tokens may now be dropped. Each kept choice weighs its router probability: this is the router's own routing
  with `expert`'s logit at -inf, except that the probabilities are not renormalised over the E - 1 others (the
  remaining experts keep the weights the trained model gives them). Only for routers whose combine weight is the
  router probability, in position order (Switch, top-k without renormalisation or scaling): ValueError otherwise.
  expert_index, slot, combine_weight, kept [G, S, K] out (`replay`'s fields, before flattening)."""
  probs = np.asarray(route.router_probs, np.float32)  # [G, S, E]
  index = np.asarray(route.expert_index)  # [G, S, K]
  kept = np.asarray(route.kept)
  weight = np.take_along_axis(probs, index, axis=-1)  # [G, S, K]
  if not np.allclose(np.asarray(route.combine_weight)[kept], weight[kept], rtol=1e-5, atol=1e-7):
    raise ValueError("next-choice ablation needs combine weights equal to the router probabilities (Switch, top-k "
                     "without renormalisation): this router's are not")
  taken = np.any(index[..., None] == np.arange(probs.shape[-1]), axis=-2)  # [G, S, E]
  taken[..., expert] = True
  successor = np.argmax(np.where(taken, -np.inf, probs), axis=-1)  # [G, S] best expert not chosen
  index = np.where(index == expert, successor[..., None], index)
  weight = np.take_along_axis(probs, index, axis=-1)
  order = np.argsort(-weight, axis=-1, kind="stable")  # choices by probability, as the router orders them
  index, weight = np.take_along_axis(index, order, axis=-1), np.take_along_axis(weight, order, axis=-1)
  slot, kept = routing.token_choice_slots(jnp.asarray(index, jnp.int32), jnp.ones(index.shape, bool), route.capacity)
  kept = np.asarray(kept)
  return {"expert_index": index, "slot": np.asarray(slot), "combine_weight": np.where(kept, weight, 0.0),
          "kept": kept}


def ablation_losses(model: nnx.Module, eval_set: evalset.EvalSet, *, batch_size: int,
                    max_tokens: int | None = None, removal: str = "residual") -> tuple[float, np.ndarray, np.ndarray]:
  """(loss, losses [NB, E], blocks [NB]): `ablation_nats` as mean target cross-entropies (nats per token) over every
  evaluated target, the model's and with expert e of MoE block blocks[b] removed. Rank them with
  `analysis.rank_ablations`."""
  nats, ablated, tokens, blocks = ablation_nats(model, eval_set, batch_size=batch_size, max_tokens=max_tokens,
                                                removal=removal)
  return float(nats.sum() / tokens.sum()), ablated.sum(axis=-1) / tokens.sum(), blocks


def ablation_nats(model: nnx.Module, eval_set: evalset.EvalSet, *, batch_size: int, max_tokens: int | None = None,
                  removal: str = "residual") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(nats [D], ablated [NB, E, D], tokens [D], blocks [NB]) on the rows of `eval_set` (the first max_tokens'
  worth): the target cross-entropy summed over each document's evaluated targets (D = len(eval_set.names); 0 for a
  document not reached) for the model and with expert e of MoE block blocks[b] removed, every other block routing
  itself, and each document's evaluated targets; per document so that `analysis.ablation_intervals` can resample
  documents. `removal` (`REMOVALS`): "residual" (`without_expert`: its tokens keep their other choices, or only the
  residual) or "next_choice" (`next_choice`: they go to their next most probable expert, capacity re-claimed). A
  block's own input does not depend on its experts, so forcing its unablated routing changed for one expert is
  exactly what removing the expert does to it. Not for Soft MoE blocks (`replay`); "next_choice" not for expert
  choice either (its experts choose)."""
  if removal not in REMOVALS:
    raise ValueError(f"removal={removal!r} must be one of {REMOVALS}")
  seq_len = eval_set.inputs.shape[1]
  rows = rows_to_trace(max_tokens, seq_len, len(eval_set.inputs))
  layers = moe_layers(model)
  if removal == "next_choice":
    for block, layer in layers.items():
      if layer.config.router in ("expert_choice", "soft_moe") or layer.config.batch_prioritized:
        raise ValueError(f"block {block}: next-choice ablation needs token-choice routing in position order; "
                         f"moe.router={layer.config.router!r}, batch_prioritized={layer.config.batch_prioritized}")
  num_experts = next(iter(layers.values())).config.num_experts
  blocks = sorted(layers)
  num_documents = len(eval_set.names)
  nats, tokens = np.zeros(num_documents), np.zeros(num_documents)
  ablated = np.zeros((len(blocks), num_experts, num_documents))
  for start, batch in zip(range(0, rows, batch_size), _batches(eval_set, batch_size, rows)):
    document = np.full(batch["weights"].shape, -1)  # [B, L]: the document of each target; -1 where it weighs 0
    window = eval_set.document[start:start + batch_size]
    document[:len(window)] = window
    document = np.where(batch["weights"] > 0, document, -1)
    inputs = jnp.asarray(batch["inputs"])
    _, routes = capture_routing(model, inputs)
    own = {b: {name: np.asarray(getattr(routes[b], name)).reshape(-1, routes[b].expert_index.shape[-1])
               for name in REPLAYED} for b in blocks}
    nats += _document_nats(_forward(model, *_batch_args(model, inputs))[0], batch, document, num_documents)
    for i, b in enumerate(blocks):
      for e in range(num_experts):
        if removal == "residual":
          forced = without_expert(own[b], e)
        else:
          forced = {name: a.reshape(own[b][name].shape) for name, a in next_choice(routes[b], e).items()}
        ablated[i, e] += _document_nats(replay(model, inputs, {b: forced})[0], batch, document, num_documents)
    tokens += np.bincount(document[document >= 0], minlength=num_documents)
  return nats, ablated, tokens, np.asarray(blocks)


def _document_nats(logits: jax.Array, batch: Mapping[str, np.ndarray], document: np.ndarray,
                   num_documents: int) -> np.ndarray:
  """float64 [D]: each document's target cross-entropies (nats) summed over the batch; document int [B, L], -1
  on targets that weigh nothing."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  target = np.asarray(jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0])
  scored = document >= 0
  return np.bincount(document[scored], weights=-target[scored].astype(np.float64), minlength=num_documents)
