"""``pqjax.load_model``: a FLUX transformer from whatever a path holds -> :class:`pqjax.io.Checkpoint`.

Above both :mod:`pqjax.io` (pqjax's own files) and ``converters`` (every other FLUX layout), which it dispatches to.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

import converters
from pqjax.io import checkpoint, single_file
from pqjax.io.atomic import partials
from pqjax.io.checkpoint import Checkpoint, Sharding
from pqjax.io.errors import CheckpointError
from pqjax.io.validate import config_diff
from pqjax.models.flux import FluxConfig

__all__ = ["load_model"]


def load_model(path, *, dtype=None, sharding: Sharding = None, expect_config: FluxConfig | None = None
               ) -> Checkpoint:
    """Load a FLUX model from whatever ``path`` is: a pqjax checkpoint directory, a pqjax safetensors file
    (:func:`pqjax.io.save_safetensors`), or any layout ``converters.load_flux`` reads (float; ``dtype`` default
    bfloat16 there). ``sharding`` applies to pqjax checkpoints only. ``expect_config``: raise
    :class:`CheckpointError` for weights of another model."""
    p = os.fspath(path)
    if os.path.isdir(p) and (checkpoint.is_checkpoint(p) or os.path.isdir(os.path.join(p, checkpoint.ARRAYS))):
        return checkpoint.load(p, dtype=dtype, sharding=sharding, expect_config=expect_config)
    if not os.path.exists(p):
        if partials(p):
            return checkpoint.load(p)  # raises with the "interrupted save" hint
        raise CheckpointError(f"{p}: no such file or directory")
    if os.path.isfile(p) and p.endswith(".safetensors") and single_file.is_pqjax_safetensors(p):
        ck = single_file.load_safetensors(p, dtype=dtype)
        if expect_config is not None and ck.config != expect_config:
            raise CheckpointError(f"{p}: checkpoint of another model ({config_diff(ck.config, expect_config)})")
        return ck
    config, params = converters.load_flux(p, dtype=jnp.bfloat16 if dtype is None else dtype)
    if expect_config is not None and config != expect_config:
        raise CheckpointError(f"{p}: weights of another model ({config_diff(config, expect_config)})")
    return Checkpoint(config=config, params=params, quant_config=None, report=None,
                      info={"formats": [], "path": os.path.abspath(p), "source": "converters.load_flux"})
