"""Import and export: a Hugging Face model directory <-> a moe_jax model, a run's workdir, or both ways.

  config, model = interop.load("/models/Mixtral-8x7B")           # in memory, one device or `mesh=`
  interop.import_to_workdir("/models/Mixtral-8x7B", "/runs/mixtral")  # a run's workdir: runstate.load reads it
  interop.export_workdir("/runs/mixtral-ft", "/models/mixtral-ft")    # back to config.json + safetensors

Import streams the checkpoint one parameter at a time, tensor by tensor: each parameter starts as an empty host
array in its final layout, each of its tensors is read from its shard straight into its view of that array
(`layout.Transform.views`: the transpose, the heads, the expert; `shards.CheckpointReader.read_into`: plain file
reads, no mapping, at most a 16 MiB buffer when the view is strided or the dtype changes), and the array is
placed on the parameter's sharding on the mesh (`jax.make_array_from_callback`: each device's block cut from it)
and dropped. So the host holds the parameters placed so far, one parameter being filled and one read buffer: on
one CPU device, where the placed model is itself host memory and the filled array becomes the device buffer
without a copy, a checkpoint of N bytes imports in N bytes plus that buffer (benchmarks/interop_import.py);
on accelerators, one parameter. No parameter is ever initialised randomly first, and nothing is compiled (the
model's shapes and shardings come from `nnx.eval_shape`). Every tensor of the checkpoint must be used and every
parameter filled: an unknown or missing tensor name, or a shape that does not fit, is a ValueError naming it,
raised before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from moe_jax import config_lib, fileio, models, optim, runstate
from moe_jax.checkpoint import Checkpointer
from moe_jax.interop import families, layout, shards

TOKENIZER_DIR = "tokenizer"  # in a workdir: the imported model's tokenizer files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}
Progress = Callable[[int, int, str], None]  # (bytes done, bytes in all, the parameter just placed)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
HOST_ALIGNMENT = 64  # bytes: the alignment at which XLA's CPU client uses a host buffer in place


@dataclasses.dataclass
class Summary:
  """What a conversion moved: parameters, their bytes and dtypes on the Hugging Face side, and the time taken."""

  family: str
  parameters: int
  bytes: int
  dtypes: tuple[str, ...]
  seconds: float

  def line(self) -> str:
    return (f"{self.family}: {self.parameters:,} parameters, {self.bytes / 2**20:,.1f} MiB "
            f"({', '.join(self.dtypes)}) in {self.seconds:.1f} s")


# ----------------------------------------------------------------------------------------------------------
# Config.


def hf_config_to_moe(hf: dict) -> tuple[ml_collections.ConfigDict, Any]:
  """(the moe_jax experiment config, the family module) of a config.json; ValueError for a family or a setting
  moe_jax does not implement."""
  family = families.of(hf)
  return family.to_config(hf), family


def hf_config_from_moe(model_cfg: config_lib.ModelConfig, family: Any, base: dict | None = None,
                       dtype: str = "float32") -> dict:
  """The config.json `transformers` reads for `model_cfg` as `family`: the family's template of non-architecture
  keys (token ids, initializer range, ...; those of `base`, the imported config.json, where given) with every
  architecture key set from `model_cfg`; a token id outside the model's vocabulary becomes None."""
  hf = json.loads(json.dumps(family.TEMPLATE))
  for key, value in (base or {}).items():
    if key in hf and not isinstance(hf[key], dict):
      hf[key] = value
  hf.update(family.to_hf(model_cfg))
  hf.update(model_type=family.MODEL_TYPE, architectures=[family.ARCHITECTURE], dtype=dtype)
  for key in TOKEN_ID_KEYS:  # a template's ids name its published tokenizer's tokens: drop those past this vocabulary
    if isinstance(hf.get(key), list):
      hf[key] = [i for i in hf[key] if 0 <= i < hf["vocab_size"]] or None
    elif hf.get(key) is not None and not 0 <= hf[key] < hf["vocab_size"]:
      hf[key] = None  # transformers refuses a padding index past the embedding (OLMo 2's nn.Embedding)
  return dict(sorted(hf.items()))


def typed_model(config: ml_collections.ConfigDict) -> config_lib.ModelConfig:
  """The checked, typed model config of an experiment config (ValueError naming a bad field)."""
  exp = config_lib.typed(config)
  return config_lib.model_config(exp, vocab_size=exp.model.vocab_size)


# ----------------------------------------------------------------------------------------------------------
# Import.


def _abstract_model(model_cfg: config_lib.ModelConfig, mesh: Mesh | None, seed: int):
  """(graphdef, the abstract parameter state, {path: ShapeDtypeStruct with its sharding}, the non-parameter state
  with values): the model's shapes without any parameter allocated; each parameter's sharding on `mesh` from its
  logical axes (replicated where it has none), or the default device without a mesh."""
  build = lambda: models.build(model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))  # noqa: E731
  with runstate.placed_on(mesh):
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    if mesh is not None:
      replicated = NamedSharding(mesh, P())
      shardings = jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated,
                               nnx.get_named_sharding(params, mesh))
    else:
      replicated = SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: replicated, params)
  flat = {path: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())
          for (path, v), (_, s) in zip(nnx.to_flat_state(params), nnx.to_flat_state(shardings))}
  return graphdef, params, flat, jax.tree.map(lambda x: jax.device_put(_filled(x, seed), replicated), rest)


def _filled(x: jax.ShapeDtypeStruct, seed: int) -> jax.Array:
  """A value for the model's non-parameter state (the dropout RNG streams: keys and counts), made directly
  instead of compiling the model's initialiser for it. Their values do not matter: training reseeds the streams
  from (seed, step) before every step (moe_jax.train)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.split(jax.random.key(seed), x.shape) if x.shape else jax.random.key(seed)
  return jax.numpy.zeros(x.shape, x.dtype)


def check_coverage(rules: list[layout.Rule], params: set, names: frozenset[str], aliases: frozenset[str],
                   family: str) -> None:
  """Every parameter filled once, every tensor used: ValueError naming what is left over or missing."""
  covered = [r.param for r in rules]
  twice = sorted({".".join(map(str, p)) for p in covered if covered.count(p) > 1})
  if twice:
    raise ValueError(f"{family}: the layout fills moe_jax parameters twice: {twice[:8]}")
  unfilled = sorted(".".join(map(str, p)) for p in params - set(covered))
  if unfilled:
    raise ValueError(f"{family}: no tensor fills the moe_jax parameters {unfilled[:8]} (an unsupported setting?)")
  strange = sorted(".".join(map(str, p)) for p in set(covered) - params)
  if strange:
    raise ValueError(f"{family}: the layout names moe_jax parameters the model does not have: {strange[:8]}")
  wanted = {t for r in rules for t in r.tensors}
  missing = sorted(wanted - names)
  if missing:
    raise ValueError(f"{family}: the checkpoint lacks the tensors {missing[:8]}"
                     + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
  unknown = sorted(names - wanted - aliases)
  if unknown:
    raise ValueError(f"{family}: the checkpoint holds tensors moe_jax does not know: {unknown[:8]}"
                     + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))


def _empty_host(shape: tuple[int, ...], dtype) -> np.ndarray:
  """np.empty with its data 64-byte aligned: jax's CPU backend adopts such a host array as a device buffer without
  copying it (an unaligned one it copies), so on CPU a parameter read into it is placed at no extra memory."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % HOST_ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """`value` on `sharding`, each device's block cut from it. With one device, the block is `value` itself (on CPU
  adopted without a copy, `_empty_host`). With several, each device gets its own copy: handed `value` itself,
  jax's CPU backend makes every replica of a replicated parameter the same host memory (checked with jax 0.10.2),
  an aliasing between devices that nothing else in moe_jax creates and no test covers."""
  if len(sharding.device_set) == 1:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.make_array_from_callback(value.shape, sharding, lambda index: np.array(value[index]))


def load_model(path: str, config: ml_collections.ConfigDict, family: Any, *, mesh: Mesh | None = None,
               progress: Progress | None = None) -> tuple[nnx.Module, Summary]:
  """The model of `config` with its parameters read from the checkpoint in `path`, placed on `mesh` (None: the
  default device, unplaced), and what was read."""
  start = time.perf_counter()
  model_cfg = typed_model(config)
  graphdef, params, abstract, rest = _abstract_model(model_cfg, mesh, config.seed)
  rules = family.rules(model_cfg)
  values, dtypes = {}, set()
  reader = shards.CheckpointReader(path)
  check_coverage(rules, set(abstract), reader.names, frozenset(getattr(family, "ALIASES", ())), family.MODEL_TYPE)
  for r in rules:  # every shape before any tensor is read
    wanted = layout.tensor_shapes(r.transform, abstract[r.param].shape)
    found = [reader.shape(name) for name in r.tensors]
    if found != wanted:
      raise ValueError(f"{family.MODEL_TYPE}: " + ", ".join(f"{n} {list(s)}" for n, s in zip(r.tensors, found))
                       + f" do not make moe_jax's {r.name} {list(abstract[r.param].shape)} (that needs "
                       + ", ".join(map(str, map(list, wanted))) + ")")
  total, done = reader.nbytes(), 0
  for r in rules:
    target = abstract[r.param]
    value = _empty_host(target.shape, target.dtype)
    for name, view in zip(r.tensors, r.transform.views(value)):
      reader.read_into(name, view)
      dtypes.add(str(reader.dtype(name)))
      done += reader.nbytes(name)
    values[r.param] = _place(value, target.sharding)
    del value  # the device array's (the same memory on one CPU device)
    if progress is not None:
      progress(done, total, r.name)
  flat = [(path, variable.replace(values[path])) for path, variable in nnx.to_flat_state(params)]
  model = nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
  count = sum(int(np.prod(v.shape)) for v in values.values())
  return model, Summary(family.MODEL_TYPE, count, done, tuple(sorted(dtypes)), time.perf_counter() - start)


def tokenizer_of(path: str) -> str:
  """data.tokenizer for the files of a model directory: its tokenizer.json, else its SentencePiece
  tokenizer.model, else 'byte'."""
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.abspath(os.path.join(path, name))
  return "byte"


def load(path: str, *, mesh: Mesh | None = None, tokenizer: str | None = None,
         progress: Progress | None = None) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """(the moe_jax experiment config, the model) of the Hugging Face model in `path`, on `mesh` (None: the default
  device). `tokenizer`: data.tokenizer of the config (default: the directory's tokenizer.json or tokenizer.model,
  else 'byte'). Run it with `models.forward(model, {"inputs": ids})` (Switch: also "decoder_inputs")."""
  hf = shards.read_config(path)
  config, family = hf_config_to_moe(hf)
  config.data.tokenizer = tokenizer or tokenizer_of(path)
  model, _ = load_model(path, config, family, mesh=mesh, progress=progress)
  return config, model


def _copy_tokenizer(path: str, hf: dict, workdir: str) -> None:
  """The source's tokenizer files copied into `workdir/tokenizer/`. A tokenizer.json without a
  tokenizer_config.json naming the EOS token gets one from config.json's eos_token_id (moe_jax's pipeline
  separates documents by EOS)."""
  found = tokenizer_of(path)
  target = os.path.join(workdir, TOKENIZER_DIR)
  os.makedirs(target, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(path, name)):
      shutil.copyfile(os.path.join(path, name), os.path.join(target, name))
  if found.endswith(".json"):
    settings_path = os.path.join(target, "tokenizer_config.json")
    settings = {}
    if os.path.isfile(settings_path):
      with open(settings_path) as f:
        settings = json.load(f)
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if not settings.get("eos_token") and eos is not None:
      from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

      settings["eos_token"] = Tokenizer.from_file(found).id_to_token(eos)
      fileio.write_json(settings_path, settings, indent=2)


def import_to_workdir(path: str, workdir: str, *, mesh: Mesh | None = None, tokenizer: str | None = None,
                      progress: Progress | None = None) -> Summary:
  """Write the Hugging Face model in `path` as step 0 of a moe_jax run in `workdir`: config.json (the requested
  and resolved config, as a training run records it) and checkpoints/0 (the parameters and a fresh optimizer
  state), which `runstate.load`, upcycling, evaluation and `train.init_from` read like any run's.

  The config's data.tokenizer is the model's own (its tokenizer.json / tokenizer.model, copied into
  `workdir/tokenizer/`) unless `tokenizer` names one; it must cover the model's vocabulary (moe_jax.resolve).
  ValueError when `workdir` already holds checkpoints.
  """
  hf = shards.read_config(path)
  config, family = hf_config_to_moe(hf)
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ValueError(f"{workdir} already holds checkpoints; import into a new workdir")
  config.data.tokenizer = tokenizer or tokenizer_of(path)
  lead = jax.process_index() == 0  # the files beside the checkpoint are written once
  created = not os.path.exists(workdir)
  copied = tokenizer is None and config.data.tokenizer != "byte"
  if lead:
    os.makedirs(workdir, exist_ok=True)
  if copied:
    if lead:
      _copy_tokenizer(path, hf, workdir)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("interop-tokenizer")
    config.data.tokenizer = os.path.join(os.path.abspath(workdir), TOKENIZER_DIR,
                                         os.path.basename(config.data.tokenizer))
  try:
    run = runstate.resolve_for_mesh(config, mesh)  # refuses a tokenizer larger than the vocabulary
    # refuses missing, unknown or misshapen tensors (before any is read) and damaged shards
    model, summary = load_model(path, run.config, family, mesh=mesh, progress=progress)
  except (ValueError, OSError):
    if lead:  # leave the workdir as it was: nothing but the tokenizer has been written yet
      if copied:
        shutil.rmtree(os.path.join(workdir, TOKENIZER_DIR))
      if created:
        os.rmdir(workdir)
    raise
  with runstate.placed_on(mesh):
    optimizer = nnx.Optimizer(model, optim.make_optimizer(run.typed.train), wrt=nnx.Param)
  if lead:
    fileio.write_json(os.path.join(workdir, "config.json"), run.record(), indent=2)
  checkpointer = Checkpointer(checkpoints, keep=run.typed.train.keep_checkpoints)
  try:
    checkpointer.save(0, runstate.checkpoint_tree(model, optimizer),
                      {"step": 0, "config": config_lib.to_dict(run.config),
                       "imported_from": {"path": os.path.abspath(path), "family": family.MODEL_TYPE,
                                         "hf_config": hf}})
    checkpointer.wait()
  finally:
    checkpointer.close()
  return summary


# ----------------------------------------------------------------------------------------------------------
# Export.


def export_model(model: nnx.Module, model_cfg: config_lib.ModelConfig, family: str | Any, path: str, *,
                 base: dict | None = None, dtype: str | None = None, max_shard_bytes: int = shards.DEFAULT_SHARD_BYTES,
                 progress: Progress | None = None) -> Summary:
  """Write `model` (of `model_cfg`) to `path` as the Hugging Face `family` ('mixtral', ... or its module):
  config.json and safetensors shards (with their index when there are several), tensors in `dtype` (default:
  `base`'s dtype, the config.json the model was imported from, else float32). Single-process: every
  parameter is gathered to this host, one at a time."""
  family = families.get(family) if isinstance(family, str) else family
  start = time.perf_counter()
  dtype = dtype or (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32"
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r} must be one of {sorted(EXPORT_DTYPES)}")
  hf = hf_config_from_moe(model_cfg, family, base, dtype)
  rules = family.rules(model_cfg)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  check_coverage(rules, set(params), frozenset(t for r in rules for t in r.tensors), frozenset(), family.MODEL_TYPE)
  total = sum(int(np.prod(v[...].shape)) for v in params.values())
  stats = {"bytes": 0}

  def tensors():
    for r in rules:
      value = np.asarray(jax.device_get(params[r.param][...]))
      for name, tensor in zip(r.tensors, r.transform.to_tensors(value)):
        tensor = np.ascontiguousarray(tensor.astype(EXPORT_DTYPES[dtype]))
        stats["bytes"] += tensor.nbytes
        yield name, tensor
      if progress is not None:
        progress(stats["bytes"], total * np.dtype(EXPORT_DTYPES[dtype]).itemsize, r.name)

  os.makedirs(path, exist_ok=True)
  shards.write_checkpoint(path, tensors(), max_shard_bytes=max_shard_bytes)
  fileio.write_json(os.path.join(path, shards.CONFIG), hf, indent=2)
  return Summary(family.MODEL_TYPE, total, stats["bytes"], (dtype,), time.perf_counter() - start)


def export_workdir(workdir: str, path: str, *, family: str | None = None, step: int | None = None,
                   dtype: str | None = None, max_shard_bytes: int = shards.DEFAULT_SHARD_BYTES,
                   progress: Progress | None = None) -> Summary:
  """Export the run in `workdir` (its checkpoint `step`, default the newest: trained, fine-tuned, upcycled or
  imported) to `path` as `family` (default: the family it was imported from). Its tokenizer files, when
  data.tokenizer is an imported tokenizer.json or tokenizer.model, are copied along."""
  loaded = runstate.load(workdir, step=step)
  source = loaded.meta.get("imported_from") or {}
  family = family or source.get("family")
  if family is None:
    raise ValueError(f"the run in {workdir} was not imported from a Hugging Face model: name the family "
                     f"(one of {', '.join(families.names())})")
  model_cfg = config_lib.model_config(loaded.typed, vocab_size=loaded.typed.model.vocab_size)
  base = source.get("hf_config") if source.get("family") == family else None
  summary = export_model(loaded.model, model_cfg, family, path, base=base, dtype=dtype,
                         max_shard_bytes=max_shard_bytes, progress=progress)
  tokenizer = os.path.expanduser(loaded.typed.data.tokenizer)
  if os.path.basename(tokenizer) in TOKENIZER_FILES:  # an imported tokenizer, with its companion files
    folder = os.path.dirname(tokenizer)
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(folder, name)):
        shutil.copyfile(os.path.join(folder, name), os.path.join(path, name))
  return summary
