"""Black Forest Labs' single-file FLUX layout (flux1-dev.safetensors & co.) <-> diffusers names.

Mirrors diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``: BFL fuses q/k/v
(``img_attn.qkv``, ``txt_attn.qkv``) and, in single blocks, q/k/v/mlp (``linear1``); its
``final_layer.adaLN_modulation.1`` stores (shift, scale) where diffusers' ``norm_out.linear``
stores (scale, shift). Keys may carry ComfyUI's ``model.diffusion_model.`` prefix.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from pqjax.models.flux import FluxConfig

from .core import Spec, infer_config
from .errors import ConversionError, key_list

PREFIX = "model.diffusion_model."

_TOP = [  # (BFL module, diffusers module)
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
]
_GUIDANCE = [
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
]
_DOUBLE = [  # (BFL module, [diffusers modules filled by consecutive row blocks])
    ("img_mod.lin", ["norm1.linear"]),
    ("txt_mod.lin", ["norm1_context.linear"]),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("img_attn.proj", ["attn.to_out.0"]),
    ("txt_attn.proj", ["attn.to_add_out"]),
    ("img_mlp.0", ["ff.net.0.proj"]),
    ("img_mlp.2", ["ff.net.2"]),
    ("txt_mlp.0", ["ff_context.net.0.proj"]),
    ("txt_mlp.2", ["ff_context.net.2"]),
]
_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k"),
]
_SINGLE = [
    ("modulation.lin", ["norm.linear"]),
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    ("linear2", ["proj_out"]),
]
_SINGLE_NORMS = [("norm.query_norm", "attn.norm_q"), ("norm.key_norm", "attn.norm_k")]


def plan(num_layers: int, num_single_layers: int, guidance_embeds: bool) -> list[Spec]:
    """Every BFL tensor of a model of this size and the diffusers keys it fills."""
    specs = []
    top = _TOP + (_GUIDANCE if guidance_embeds else [])
    for b, d in top:
        specs += [Spec(f"{b}.weight", (f"{d}.weight",)), Spec(f"{b}.bias", (f"{d}.bias",))]
    specs += [Spec("final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), swap_halves=True),
              Spec("final_layer.adaLN_modulation.1.bias", ("norm_out.linear.bias",), swap_halves=True)]
    for blocks, n, dprefix, linears, norms in (
            ("double_blocks", num_layers, "transformer_blocks", _DOUBLE, _DOUBLE_NORMS),
            ("single_blocks", num_single_layers, "single_transformer_blocks", _SINGLE, _SINGLE_NORMS)):
        for i in range(n):
            src, dst = f"{blocks}.{i}.", f"{dprefix}.{i}."
            for b, ds in linears:
                for p in ("weight", "bias"):
                    specs.append(Spec(f"{src}{b}.{p}", tuple(f"{dst}{d}.{p}" for d in ds)))
            for b, d in norms:
                specs.append(Spec(f"{src}{b}.scale", (f"{dst}{d}.weight",)))
    return specs


def is_bfl_keys(keys) -> bool:
    return "img_in.weight" in keys or any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys)


def strip_prefix(keys) -> dict[str, str]:
    """BFL name -> key in the file (drops ComfyUI's prefix; then ignores keys outside it: VAE, text encoders)."""
    keys = list(keys)
    if any(k.startswith(PREFIX) for k in keys):
        return {k[len(PREFIX):]: k for k in keys if k.startswith(PREFIX)}
    return {k: k for k in keys}


def infer_from_shapes(shapes: Mapping[str, tuple[int, ...]], overrides, origin: str) -> FluxConfig:
    return infer_config(
        shapes, {"img_in": "img_in.weight", "txt_in": "txt_in.weight", "vec_in": "vector_in.in_layer.weight",
                 "final": "final_layer.linear.weight"},
        double_prefix="double_blocks.", single_prefix="single_blocks.",
        head_scale=("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale"),
        guidance_prefix="guidance_in.", overrides=overrides, origin=origin)


def _count(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(idx) + 1 if idx else 0


def diffusers_to_bfl(state_dict: Mapping[str, object]) -> dict:
    """diffusers FluxTransformer2DModel state dict -> BFL-named dict (fused qkv / linear1, shift-scale swap).

    Works on torch tensors or numpy arrays (values keep their type); the inverse of what
    :func:`converters.load_flux` does with a BFL file."""
    keys = set(state_dict)
    specs = plan(_count(keys, "transformer_blocks."), _count(keys, "single_transformer_blocks."),
                 any(k.startswith("time_text_embed.guidance_embedder.") for k in keys))
    needed = {t for s in specs for t in s.targets}
    missing, unexpected = needed - keys, keys - needed
    if missing or unexpected:
        raise ConversionError(f"diffusers_to_bfl: not a FLUX transformer state dict; missing: "
                              f"{key_list(missing) or 'none'}; unexpected: {key_list(unexpected) or 'none'}")
    out = {}
    for s in specs:
        parts = [state_dict[t] for t in s.targets]
        if s.swap_halves:
            (w,) = parts
            half = w.shape[0] // 2
            parts = [w[half:], w[:half]]  # diffusers (scale, shift) -> BFL (shift, scale)
        out[s.key] = _cat(parts)
    return out


def _cat(parts):
    if len(parts) == 1:
        return parts[0]
    try:
        import torch
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts, 0).contiguous()
    except ImportError:
        pass
    return np.concatenate([np.asarray(p) for p in parts], 0)
