"""What the families share: reading a Hugging Face config.json into moe_jax config fields (rotary settings, dtype,
refusals of what moe_jax does not implement) and building the moe_jax experiment config."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from moe_jax import config_lib

# HF `dtype` (transformers 5) / `torch_dtype` (4.x) -> moe_jax's compute dtype (model.dtype). Parameters are
# float32 in moe_jax whatever the checkpoint holds (bfloat16 and float16 convert to float32 exactly).
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32", None: "float32"}


def unsupported(family: str, key: str, value: Any, why: str) -> ValueError:
  return ValueError(f"{family}: config.json {key}={value!r} is not supported: {why}")


def get(hf: Mapping[str, Any], family: str, key: str, *alternatives: str) -> Any:
  """hf[key] (or the first alternative key present); ValueError naming the key when none is."""
  for name in (key, *alternatives):
    if hf.get(name) is not None:
      return hf[name]
  raise ValueError(f"{family}: config.json has no {key!r}" + (f" (nor {alternatives})" if alternatives else ""))


def dtype(hf: Mapping[str, Any], family: str) -> str:
  value = hf.get("dtype", hf.get("torch_dtype"))
  if value not in DTYPES:
    raise unsupported(family, "dtype", value, f"one of {sorted(k for k in DTYPES if k)} is")
  return DTYPES[value]


def rope_fields(hf: Mapping[str, Any], family: str, theta: float | None = None) -> dict[str, Any]:
  """moe_jax's rotary fields (model.rope_*) from `rope_parameters` (transformers 5) or the Hub's top-level
  `rope_theta` / `rope_scaling`. `theta`: a value the family keeps elsewhere (DBRX's attn_config), checked
  against `rope_parameters` when both are present. Refuses a rope_type moe_jax does not implement."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  kind = params.get("rope_type", params.get("type", "default"))
  found = params.get("rope_theta", hf.get("rope_theta"))
  if theta is not None and found is not None and float(found) != float(theta):
    raise ValueError(f"{family}: rope_theta {theta} and rope_parameters.rope_theta {found} disagree")
  theta = float(theta if theta is not None else found if found is not None else 10_000.0)
  fields: dict[str, Any] = {"rope_theta": theta}
  if kind == "default":
    return fields
  if kind == "llama3":
    fields.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
                  rope_low_freq_factor=float(params["low_freq_factor"]),
                  rope_high_freq_factor=float(params["high_freq_factor"]),
                  rope_original_max_len=int(params["original_max_position_embeddings"]))
    return fields
  if kind == "longrope":
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    fields.update(rope_scaling="longrope", rope_short_factor=tuple(map(float, params["short_factor"])),
                  rope_long_factor=tuple(map(float, params["long_factor"])),
                  rope_short_mscale=float(params["short_mscale"]), rope_long_mscale=float(params["long_mscale"]),
                  rope_original_max_len=int(original))
    return fields
  raise unsupported(family, "rope_parameters.rope_type", kind, "moe_jax implements 'default', 'llama3', 'longrope'")


def rope_parameters(model: Any) -> dict[str, Any]:
  """transformers 5's `rope_parameters` of a typed ModelConfig (the inverse of `rope_fields`)."""
  scaling = getattr(model, "rope_scaling", "none")
  out: dict[str, Any] = {"rope_theta": float(model.rope_theta), "rope_type": "default"}
  if scaling == "llama3":
    out.update(rope_type="llama3", factor=model.rope_scaling_factor, low_freq_factor=model.rope_low_freq_factor,
               high_freq_factor=model.rope_high_freq_factor,
               original_max_position_embeddings=model.rope_original_max_len)
  elif scaling == "longrope":
    out.update(rope_type="longrope", short_factor=list(model.rope_short_factor),
               long_factor=list(model.rope_long_factor), short_mscale=model.rope_short_mscale,
               long_mscale=model.rope_long_mscale, original_max_position_embeddings=model.rope_original_max_len)
  return dict(sorted(out.items()))


def sliding_window(hf: Mapping[str, Any], family: str, key: str = "sliding_window") -> None:
  """Refuse a sliding window shorter than the model's context (it would change attention); moe_jax has none."""
  window = hf.get(key)
  enabled = hf.get("use_sliding_window", True)
  if window and enabled and window < hf.get("max_position_embeddings", 0):
    raise unsupported(family, key, window, "sliding-window attention is not implemented in moe_jax (the window is "
                      f"shorter than max_position_embeddings={hf.get('max_position_embeddings')})")


def experiment_config(model: Mapping[str, Any], moe: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The moe_jax experiment config (configs/*.py's kind) of an imported model: the defaults with `model` and `moe`
  fields set (`moe` keys may be dotted into a router's section, 'top_k.k'), one device per default mesh
  (runstate.load resolves it for any mesh), training lengths within the model's."""
  config = config_lib.default_config()
  for name, value in model.items():
    config.model[name] = value
  config.model.moe_layer_interval = model.get("moe_layer_interval", 0)
  for name, value in (moe or {}).items():
    section = config.moe
    *parents, leaf = name.split(".")
    for part in parents:
      section = section[part]
    section[leaf] = value
  config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
  config.mesh.update(dict(data=0, fsdp=1, expert=1, tensor=1))
  return config
