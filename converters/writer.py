"""Write float FLUX params as a diffusers model folder (config.json + safetensors, sharded or not), without torch.

The inverse of :func:`converters.load_flux` for the diffusers layout: used by the demo (a seeded model written and
read back through the real loader) and by anyone exporting pqjax float params to diffusers.
"""
from __future__ import annotations

import json
import os

import numpy as np

from pqjax.io.atomic import atomic_write
from pqjax.io.safetensors import save_file
from pqjax.models.flux import FluxConfig

from .core import state_dict_layout

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def to_state_dict(config: FluxConfig, params) -> dict[str, np.ndarray]:
    """params pytree -> diffusers state dict (numpy, torch layout: Linear weights [out, in])."""
    out = {}
    for key, leaf in state_dict_layout(config).items():
        node = params
        for p in leaf.path:
            node = node[p]
        a = np.asarray(node)
        out[key] = np.ascontiguousarray(a.T if leaf.transpose else a)
        if out[key].shape != leaf.torch_shape:
            raise ValueError(f"param {'.'.join(leaf.path)} has shape {a.shape}, expected {leaf.torch_shape} (torch)")
    return out


def save_diffusers(folder, config: FluxConfig, params, *, max_shard_bytes: int | None = None,
                   dtype=np.float32) -> None:
    """Write ``folder/config.json`` and the weights (one file, or shards + index when ``max_shard_bytes`` is set).

    Atomic (:func:`pqjax.io.atomic.atomic_write`): a crash leaves no half-written model; an existing ``folder``
    raises :class:`FileExistsError`.
    """
    folder = os.fspath(folder)
    sd = {k: v.astype(dtype) for k, v in to_state_dict(config, params).items()}
    if os.path.exists(folder):
        raise FileExistsError(f"{folder} already exists; refusing to overwrite")
    with atomic_write(folder, directory=True) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"_class_name": "FluxTransformer2DModel", **config.to_dict()}, f, indent=2)
        if max_shard_bytes is None:
            save_file(os.path.join(tmp, WEIGHTS), sd, {"format": "pt"})
            return
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            if cur and size + v.nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += v.nbytes
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(os.path.join(tmp, name), shard, {"format": "pt"})
            weight_map.update({k: name for k in shard})
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}, f,
                      indent=2)
