"""``load_flux``: any FLUX checkpoint layout -> (FluxConfig, params)."""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp

from pqjax.models.flux import FluxConfig

from . import bfl, diffusers_format
from .core import check_overrides, materialize
from .errors import ConversionError


def load_flux(path, dtype=jnp.bfloat16, *, config_overrides: Mapping[str, Any] | None = None
              ) -> tuple[FluxConfig, dict]:
    """Load a FLUX transformer as ``(FluxConfig, params)`` with every leaf a ``dtype`` jax array.

    ``path``: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors, or
    sharded with its .index.json), a diffusers pipeline folder (model_index.json + transformer/),
    or a single ``.safetensors`` file in BFL layout (flux1-dev.safetensors; config inferred from
    shapes) or diffusers layout. ``config_overrides`` replaces config fields, e.g.
    ``{"axes_dims_rope": (8, 28, 28)}`` for a single file whose head dim is not 128 (the rope axes
    are not stored in the weights). Tensors are read one at a time (memory-mapped) and converted
    to ``dtype`` on the fly; any problem raises :class:`ConversionError` before params are returned.
    """
    path = os.fspath(path)
    check_overrides(config_overrides)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        folder = diffusers_format.model_folder(path)
        config = diffusers_format.read_config(folder, config_overrides)
        files = diffusers_format.open_weights(folder)
        return config, materialize(config, diffusers_format.plan(config), files, dtype, folder)
    return _load_single_file(path, dtype, config_overrides)


_OTHER_FORMATS = (".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _load_single_file(path: str, dtype, overrides):
    if path.lower().endswith(_OTHER_FORMATS):
        raise ConversionError(f"{path}: only .safetensors checkpoints are supported (pickle/GGUF files are not read)")
    f = diffusers_format.open_safetensors(path)
    names = bfl.strip_prefix(f.keys())
    if bfl.is_bfl_keys(names):
        shapes = {k: f.info(orig).shape for k, orig in names.items()}
        config = bfl.infer_from_shapes(shapes, overrides, path)
        plan = bfl.plan(config.num_layers, config.num_single_layers, config.guidance_embeds)
        ignored = [k for k in f.keys() if k not in set(names.values())]
        files = {k: (f, orig) for k, orig in names.items()}
        return config, materialize(config, plan, files, dtype, path, ignored=ignored)
    if diffusers_format.is_diffusers_keys(f.keys()):
        cfg_json = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if os.path.isfile(cfg_json):
            config = diffusers_format.read_config(os.path.dirname(os.path.abspath(path)), overrides)
        else:
            config = diffusers_format.infer_from_shapes({k: f.info(k).shape for k in f.keys()}, overrides, path)
        files = {k: (f, k) for k in f.keys()}
        return config, materialize(config, diffusers_format.plan(config), files, dtype, path)
    sample = sorted(f.keys())[:10]
    raise ConversionError(
        f"{path}: unrecognised checkpoint layout: expected BFL FLUX keys (e.g. 'img_in.weight', "
        f"'double_blocks.0.img_attn.qkv.weight', 'single_blocks.0.linear1.weight', optionally prefixed "
        f"'{bfl.PREFIX}') or diffusers FluxTransformer2DModel keys (e.g. 'x_embedder.weight', "
        f"'transformer_blocks.0.attn.to_q.weight'); found {len(f.keys())} keys, e.g. {sample}")
