"""Tiny FLUX builders shared by tests: seeded diffusers models, every checkpoint layout, inputs.

    model = make_diffusers_model(seed=0)               # torch CPU, eval mode, every param randomized
    paths = write_layouts(model, tmp_dir)              # {"folder", "sharded", "pipeline", "bfl"}
    inputs = make_inputs(config_dict, batch=2, n_img=16, n_txt=7, seed=1)
    ref = torch_forward(model, inputs)                 # numpy, diffusers' output
"""
from __future__ import annotations

import json
import os

import numpy as np

#: The quantization-friendly tiny config (every K a multiple of 16 and 64).
TINY = dict(num_attention_heads=2, attention_head_dim=64, axes_dims_rope=(8, 28, 28), in_channels=64,
            joint_attention_dim=64, pooled_projection_dim=64, num_layers=2, num_single_layers=2,
            guidance_embeds=True)


def tiny_config(**overrides) -> dict:
    return {**TINY, **overrides}


def make_diffusers_model(seed: int = 0, **overrides):
    """Seeded ``FluxTransformer2DModel(**tiny_config(**overrides))`` with ALL parameters randomized.

    diffusers zero/one-initializes some tensors (biases, RMSNorm scales); a converter that mixed
    them up would go unnoticed, so every tensor gets fresh noise: weights N(0, 1/fan_in),
    biases N(0, 0.1^2), RMSNorm scales 1 + N(0, 0.2^2)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**tiny_config(**overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif ".norm_" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def write_layouts(model, root, *, shard_size: str = "200KB", dtype=None) -> dict[str, str]:
    """Save ``model`` as a diffusers folder, a sharded folder, a pipeline folder and a BFL file.

    ``dtype`` (a torch dtype) casts the weights first (e.g. ``torch.bfloat16``)."""
    import torch
    from safetensors.torch import save_file

    from converters import diffusers_to_bfl

    root = os.fspath(root)
    if dtype is not None:
        import copy
        model = copy.deepcopy(model).to(dtype)
    paths = {"folder": os.path.join(root, "folder"), "sharded": os.path.join(root, "sharded"),
             "pipeline": os.path.join(root, "pipeline"), "bfl": os.path.join(root, "flux1-tiny.safetensors")}
    model.save_pretrained(paths["folder"], safe_serialization=True)
    model.save_pretrained(paths["sharded"], safe_serialization=True, max_shard_size=shard_size)
    model.save_pretrained(os.path.join(paths["pipeline"], "transformer"), safe_serialization=True)
    with open(os.path.join(paths["pipeline"], "model_index.json"), "w") as f:
        json.dump({"_class_name": "FluxPipeline", "_diffusers_version": "0.42.0",
                   "transformer": ["diffusers", "FluxTransformer2DModel"]}, f)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(sd).items()}
    save_file(bfl, paths["bfl"])
    return paths


def image_ids(h: int, w: int) -> np.ndarray:
    """FLUX's latent image ids: (0, row, col) per packed 2x2 latent patch."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(config: dict, *, batch: int, n_img: int, n_txt: int, seed: int, grid=None) -> dict:
    """Fresh random forward inputs (numpy float32), keyed like diffusers' forward arguments."""
    rng = np.random.default_rng(seed)
    c = {**TINY, **config}
    h, w = grid or next((h, n_img // h) for h in range(int(n_img ** 0.5), 0, -1) if n_img % h == 0)
    inputs = dict(
        hidden_states=rng.standard_normal((batch, n_img, c["in_channels"]), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, n_txt, c["joint_attention_dim"]), np.float32),
        pooled_projections=rng.standard_normal((batch, c["pooled_projection_dim"]), np.float32),
        timestep=rng.uniform(0.05, 1.0, (batch,)).astype(np.float32),
        img_ids=image_ids(h, w),
        txt_ids=np.zeros((n_txt, 3), np.float32),
    )
    if c["guidance_embeds"]:
        inputs["guidance"] = rng.uniform(1.0, 5.0, (batch,)).astype(np.float32)
    return inputs


def torch_forward(model, inputs: dict) -> np.ndarray:
    """diffusers' ``model(**inputs, return_dict=False)[0]`` as float32 numpy."""
    import torch

    dtype = next(model.parameters()).dtype
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    t = {k: (v.to(dtype) if k not in ("img_ids", "txt_ids") else v) for k, v in t.items()}
    with torch.no_grad():
        out = model(**t, return_dict=False)[0]
    return out.float().numpy()
