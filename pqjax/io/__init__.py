"""The files pqjax writes and reads: its checkpoints, its single safetensors files, and the safetensors format itself.

    pqjax.save(path, qparams, config, report)       # pqjax.io.checkpoint: orbax directory, atomic
    pqjax.load(path)                                 # -> Checkpoint(config, params, quant_config, report, info)
    save_safetensors(path, qparams, config, report)  # pqjax.io.single_file: one file, readable without pqjax

Modules: :mod:`.safetensors` (the one safetensors reader/writer and dtype table, which converters read FLUX, CLIP,
T5 and VAE weights with), :mod:`.atomic` (write-then-rename), :mod:`.tree` (params <-> arrays + JSON spec),
:mod:`.validate` (the params fit the model config), :mod:`.checkpoint`, :mod:`.single_file`. The io package sits
below converters; :func:`pqjax.load_model` (:mod:`pqjax.loading`) reads any of these or foreign FLUX weights.
"""
from .checkpoint import FORMAT, FORMAT_VERSION, MANIFEST, Checkpoint, is_checkpoint, load, save
from .errors import CheckpointError
from .single_file import is_pqjax_safetensors, load_safetensors, save_safetensors
from .validate import config_diff, validate_params

__all__ = ["save", "load", "Checkpoint", "CheckpointError", "is_checkpoint", "save_safetensors",
           "load_safetensors", "is_pqjax_safetensors", "validate_params", "config_diff", "FORMAT", "FORMAT_VERSION",
           "MANIFEST"]
