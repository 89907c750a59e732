"""Hugging Face checkpoints in and out of moe_jax: config.json + safetensors shards <-> a moe_jax model or run.

  config, model = interop.load(path)                  # in memory (one device, or mesh=)
  interop.import_to_workdir(path, workdir)            # step 0 of a run: runstate.load / upcycling / init_from
  interop.export_workdir(workdir, path)               # back, for transformers' own classes

Modules: `shards` (reading and writing safetensors files and their index), `layout` (tensor <-> parameter
transforms), `decoder` (the Llama-style table most families share), `common` (config.json reading), `families`
(the registry) and one module per family with its names and table; `transfer` does the moving.
The tensor names and math of each family: docs/interop_fixtures.md.
"""

from moe_jax.interop.families import get as family, names as family_names
from moe_jax.interop.transfer import (Summary, export_model, export_workdir, hf_config_from_moe, hf_config_to_moe,
                                      import_to_workdir, load, load_model)

__all__ = ["Summary", "export_model", "export_workdir", "family", "family_names", "hf_config_from_moe",
           "hf_config_to_moe", "import_to_workdir", "load", "load_model"]
