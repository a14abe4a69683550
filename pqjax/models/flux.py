"""FLUX.1 transformer (diffusers' ``FluxTransformer2DModel``) as pure JAX functions over a params pytree.

Parameters are nested dicts keyed by diffusers module names, e.g.
``params["transformer_blocks"]["0"]["attn"]["to_q"]["kernel"]``. Linear layers hold
``{"kernel": [in, out], "bias": [out]}`` (Flax layout), RMSNorms hold ``{"scale": [dim]}``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Every field of diffusers' ``FluxTransformer2DModel`` config (same names, same defaults)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"FluxConfig: sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal "
                f"attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return 4 * self.inner_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @classmethod
    def flux_dev(cls) -> "FluxConfig":
        return cls(guidance_embeds=True)

    @classmethod
    def flux_schnell(cls) -> "FluxConfig":
        return cls(guidance_embeds=False)

    @classmethod
    def tiny(cls, **overrides) -> "FluxConfig":
        """DESIGN.md's quantization-friendly tiny config (every K a multiple of 16 and 64)."""
        base = dict(num_attention_heads=2, attention_head_dim=64, axes_dims_rope=(8, 28, 28), in_channels=64,
                    joint_attention_dim=64, pooled_projection_dim=64, num_layers=2, num_single_layers=2,
                    guidance_embeds=True)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path) -> "FluxConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))
