"""Every file pqjax reads or writes: its checkpoints, single safetensors files, and any FLUX weights (via converters).

    pqjax.save(path, qparams, config, report)       # pqjax.io.checkpoint: orbax directory, atomic
    pqjax.load(path)                                 # -> Checkpoint(config, params, quant_config, report, info)
    pqjax.load_model(path)                           # a checkpoint, a pqjax .safetensors, or float FLUX weights
    save_safetensors(path, qparams, config, report)  # pqjax.io.single_file: one file, readable without pqjax

Modules: :mod:`.safetensors` (the one safetensors reader/writer and dtype table), :mod:`.atomic` (write-then-rename),
:mod:`.tree` (params <-> arrays + JSON spec), :mod:`.validate` (the params fit the model config),
:mod:`.checkpoint`, :mod:`.single_file`, :mod:`.model` (``load_model``).
"""
from .checkpoint import FORMAT, FORMAT_VERSION, MANIFEST, Checkpoint, is_checkpoint, load, save
from .errors import CheckpointError
from .model import load_model
from .single_file import is_pqjax_safetensors, load_safetensors, save_safetensors
from .validate import config_diff, validate_params

__all__ = ["save", "load", "load_model", "Checkpoint", "CheckpointError", "is_checkpoint", "save_safetensors",
           "load_safetensors", "is_pqjax_safetensors", "validate_params", "config_diff", "FORMAT", "FORMAT_VERSION",
           "MANIFEST"]
