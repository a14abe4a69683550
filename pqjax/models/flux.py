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


# ----------------------------------------------------------------------------------------------
# Parameter layout
# ----------------------------------------------------------------------------------------------

def _linear(k_in: int, k_out: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    d = {"kernel": (k_in, k_out)}
    if bias:
        d["bias"] = (k_out,)
    return d


def param_layout(config: FluxConfig) -> Params:
    """Nested dict of parameter shapes (tuples), keyed exactly like diffusers' state dict."""
    c, D, hd = config, config.inner_dim, config.attention_head_dim
    mlp = c.mlp_hidden_dim
    tte: Params = {
        "timestep_embedder": {"linear_1": _linear(256, D), "linear_2": _linear(D, D)},
        "text_embedder": {"linear_1": _linear(c.pooled_projection_dim, D), "linear_2": _linear(D, D)},
    }
    if c.guidance_embeds:
        tte["guidance_embedder"] = {"linear_1": _linear(256, D), "linear_2": _linear(D, D)}

    def double_block():
        attn = {name: _linear(D, D) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        attn.update({name: {"scale": (hd,)} for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
        attn["to_out"] = {"0": _linear(D, D)}
        attn["to_add_out"] = _linear(D, D)
        ff = lambda: {"net": {"0": {"proj": _linear(D, mlp)}, "2": _linear(mlp, D)}}
        return {"norm1": {"linear": _linear(D, 6 * D)}, "norm1_context": {"linear": _linear(D, 6 * D)},
                "attn": attn, "ff": ff(), "ff_context": ff()}

    def single_block():
        attn = {name: _linear(D, D) for name in ("to_q", "to_k", "to_v")}
        attn.update({"norm_q": {"scale": (hd,)}, "norm_k": {"scale": (hd,)}})
        return {"norm": {"linear": _linear(D, 3 * D)}, "proj_mlp": _linear(D, mlp),
                "proj_out": _linear(D + mlp, D), "attn": attn}

    return {
        "x_embedder": _linear(c.in_channels * c.patch_size * c.patch_size, D),
        "context_embedder": _linear(c.joint_attention_dim, D),
        "time_text_embed": tte,
        "transformer_blocks": {str(i): double_block() for i in range(c.num_layers)},
        "single_transformer_blocks": {str(i): single_block() for i in range(c.num_single_layers)},
        "norm_out": {"linear": _linear(D, 2 * D)},
        "proj_out": _linear(D, c.out_dim),
    }


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_shapes(config: FluxConfig, dtype=jnp.bfloat16) -> Params:
    """``jax.ShapeDtypeStruct`` pytree of the parameters (no allocation)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_layout(config), is_leaf=_is_shape)


def init_params(config: FluxConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) kernels/biases, unit RMSNorm scales); for tests and demos."""
    layout = param_layout(config)
    leaves, treedef = jax.tree.flatten(layout, is_leaf=_is_shape)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(layout, is_leaf=_is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if path[-1].key == "scale":
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)
