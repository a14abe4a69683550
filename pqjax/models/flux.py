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

from pqjax.models.common import is_shape

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
        """The quantization-friendly tiny config (every K a multiple of 16 and 64)."""
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


def param_shapes(config: FluxConfig, dtype=jnp.bfloat16) -> Params:
    """``jax.ShapeDtypeStruct`` pytree of the parameters (no allocation)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_layout(config), is_leaf=is_shape)


def init_params(config: FluxConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) kernels/biases, unit RMSNorm scales); for tests, demos and training.

    Drawn with ``jax.random`` so it traces under ``jax.jit`` (unlike ``common.random_params``, which draws on the host
    to avoid compiling a sampler per shape when called eagerly)."""
    layout = param_layout(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(layout, is_leaf=is_shape)
    keys = jax.random.split(key, len(flat))
    out = [jnp.ones(shape, dtype) if path[-1].key == "scale"
           else (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
           for (path, shape), k in zip(flat, keys)]
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# Forward pass (diffusers FluxTransformer2DModel.forward(..., return_dict=False)[0])
# ----------------------------------------------------------------------------------------------

from pqjax.models.layers import (Tap, apply_rope, attention, dense, dense_site, gelu_tanh,  # noqa: E402
                                 layer_norm, rms_norm, rope_tables, timestep_embedding)


def _modulated(p_norm: dict | None, x: jax.Array, shift: jax.Array, scale: jax.Array):
    """adaLN modulation of a normalized activation -> ``(xm, perm)``: ``xm[..., perm]`` is the site's input.

    PermuQuant P1/P3 read the normalized activation in the site's channel order ``perm`` (absorbed into the norm;
    LayerNorm statistics are order-free) while the absorbed shift/scale chunks are already in that order. The
    modulation is computed in the ORIGINAL order (shift/scale un-permuted by a scatter of a [B, D] vector; the same
    float ops per element) so that the gather can be fused into the consumer's activation quantization
    (:func:`pqjax.models.layers.dense_site`). Absent ``perm`` means identity.
    """
    perm = None if p_norm is None else p_norm.get("perm")
    if perm is not None:
        shift = jnp.zeros_like(shift).at[:, perm].set(shift)
        scale = jnp.zeros_like(scale).at[:, perm].set(scale)
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None], perm


def _heads(x: jax.Array, head_dim: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], -1, head_dim)


def _embed_time_text(config: FluxConfig, p: Params, timestep, guidance, pooled, dtype, tap: Tap) -> jax.Array:
    def mlp(pp, x, name):
        h = jax.nn.silu(dense(pp["linear_1"], x, f"{name}.linear_1", tap))
        return dense(pp["linear_2"], h, f"{name}.linear_2", tap)

    temb = mlp(p["timestep_embedder"], timestep_embedding(timestep).astype(dtype), "time_text_embed.timestep_embedder")
    if config.guidance_embeds:
        if guidance is None:
            raise ValueError("FluxConfig.guidance_embeds=True (FLUX.1-dev-like model): `guidance` is required")
        temb = temb + mlp(p["guidance_embedder"], timestep_embedding(guidance).astype(dtype),
                          "time_text_embed.guidance_embedder")
    return temb + mlp(p["text_embedder"], pooled, "time_text_embed.text_embedder")


def _double_block(config: FluxConfig, p: Params, x, ctx, temb_act, rope, name: str, tap: Tap):
    hd = config.attention_head_dim
    n = name
    mod = jnp.split(dense(p["norm1"]["linear"], temb_act, f"{n}.norm1.linear", tap), 6, axis=-1)
    cmod = jnp.split(dense(p["norm1_context"]["linear"], temb_act, f"{n}.norm1_context.linear", tap), 6, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmod

    a = p["attn"]
    xn, perm = _modulated(p["norm1"], x, shift_msa, scale_msa)
    cn, cperm = _modulated(p["norm1_context"], ctx, c_shift_msa, c_scale_msa)
    q, k, v = dense_site([a["to_q"], a["to_k"], a["to_v"]], xn, [f"{n}.attn.to_{c}" for c in "qkv"], tap, perm)
    cq, ck, cv = dense_site([a["add_q_proj"], a["add_k_proj"], a["add_v_proj"]], cn,
                            [f"{n}.attn.add_{c}_proj" for c in "qkv"], tap, cperm)
    q = rms_norm(a["norm_q"], _heads(q, hd))
    k = rms_norm(a["norm_k"], _heads(k, hd))
    v = _heads(v, hd)
    cq = rms_norm(a["norm_added_q"], _heads(cq, hd))
    ck = rms_norm(a["norm_added_k"], _heads(ck, hd))
    cv = _heads(cv, hd)
    cos, sin = rope
    q = apply_rope(jnp.concatenate([cq, q], axis=1), cos, sin)
    k = apply_rope(jnp.concatenate([ck, k], axis=1), cos, sin)
    o = attention(q, k, jnp.concatenate([cv, v], axis=1))
    o = o.reshape(*o.shape[:2], -1)
    n_txt = ctx.shape[1]
    c_attn = dense(a["to_add_out"], o[:, :n_txt], f"{n}.attn.to_add_out", tap)
    x_attn = dense(a["to_out"]["0"], o[:, n_txt:], f"{n}.attn.to_out.0", tap)

    x = x + gate_msa[:, None] * x_attn
    xn, perm = _modulated(p.get("norm2"), x, shift_mlp, scale_mlp)
    (h,) = dense_site([p["ff"]["net"]["0"]["proj"]], xn, [f"{n}.ff.net.0.proj"], tap, perm)
    h = gelu_tanh(h)
    x = x + gate_mlp[:, None] * dense(p["ff"]["net"]["2"], h, f"{n}.ff.net.2", tap)

    ctx = ctx + c_gate_msa[:, None] * c_attn
    cn, cperm = _modulated(p.get("norm2_context"), ctx, c_shift_mlp, c_scale_mlp)
    (h,) = dense_site([p["ff_context"]["net"]["0"]["proj"]], cn, [f"{n}.ff_context.net.0.proj"], tap, cperm)
    h = gelu_tanh(h)
    ctx = ctx + c_gate_mlp[:, None] * dense(p["ff_context"]["net"]["2"], h, f"{n}.ff_context.net.2", tap)
    return x, ctx


def _single_block(config: FluxConfig, p: Params, xs, temb_act, rope, name: str, tap: Tap):
    hd, n = config.attention_head_dim, name
    shift, scale, gate = jnp.split(dense(p["norm"]["linear"], temb_act, f"{n}.norm.linear", tap), 3, axis=-1)
    xn, perm = _modulated(p["norm"], xs, shift, scale)
    a = p["attn"]
    mlp, q, k, v = dense_site([p["proj_mlp"], a["to_q"], a["to_k"], a["to_v"]], xn,
                              [f"{n}.proj_mlp"] + [f"{n}.attn.to_{c}" for c in "qkv"], tap, perm)
    mlp = gelu_tanh(mlp)
    q = rms_norm(a["norm_q"], _heads(q, hd))
    k = rms_norm(a["norm_k"], _heads(k, hd))
    v = _heads(v, hd)
    cos, sin = rope
    o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    o = o.reshape(*o.shape[:2], -1)
    out = dense(p["proj_out"], jnp.concatenate([o, mlp], axis=-1), f"{n}.proj_out", tap)
    return xs + gate[:, None] * out


def forward(config: FluxConfig, params: Params, *, hidden_states, encoder_hidden_states, pooled_projections,
            timestep, img_ids, txt_ids, guidance=None, tap: Tap = None) -> jax.Array:
    """The FLUX transformer: same arguments, conventions and result as diffusers'
    ``FluxTransformer2DModel.forward(..., return_dict=False)[0]``.

    hidden_states [B, N_img, in_channels]; encoder_hidden_states [B, N_txt, joint_attention_dim];
    pooled_projections [B, pooled_projection_dim]; timestep / guidance [B] in sigma units (scaled by 1000 inside);
    img_ids [N_img, 3], txt_ids [N_txt, 3]. The computation dtype is ``hidden_states.dtype``. Works with float params
    and with the quantized params of ``pqjax.quantize`` (same call). ``tap(name, x)``, if given, sees the input of every
    linear (used by calibration).
    """
    c = config
    x = jnp.asarray(hidden_states)
    dtype = x.dtype
    B = x.shape[0]
    _check_inputs(c, x, encoder_hidden_states, pooled_projections, img_ids, txt_ids)
    if img_ids.ndim == 3:  # diffusers accepts (deprecated) batched ids and uses the first
        img_ids = img_ids[0]
    if txt_ids.ndim == 3:
        txt_ids = txt_ids[0]

    x = dense(params["x_embedder"], x, "x_embedder", tap)
    timestep = jnp.broadcast_to(jnp.asarray(timestep, dtype), (B,)) * 1000
    if guidance is not None:
        guidance = jnp.broadcast_to(jnp.asarray(guidance, dtype), (B,)) * 1000
    temb = _embed_time_text(c, params["time_text_embed"], timestep, guidance if c.guidance_embeds else None,
                            jnp.asarray(pooled_projections, dtype), dtype, tap)
    ctx = dense(params["context_embedder"], jnp.asarray(encoder_hidden_states, dtype), "context_embedder", tap)
    rope = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=0), c.axes_dims_rope)
    temb_act = jax.nn.silu(temb)  # every modulation linear reads SiLU(temb): one shared site

    for i in range(c.num_layers):
        x, ctx = _double_block(c, params["transformer_blocks"][str(i)], x, ctx, temb_act, rope,
                               f"transformer_blocks.{i}", tap)
    n_txt = ctx.shape[1]
    xs = jnp.concatenate([ctx, x], axis=1)
    for i in range(c.num_single_layers):
        xs = _single_block(c, params["single_transformer_blocks"][str(i)], xs, temb_act, rope,
                           f"single_transformer_blocks.{i}", tap)
    x = xs[:, n_txt:]

    scale, shift = jnp.split(dense(params["norm_out"]["linear"], temb_act, "norm_out.linear", tap), 2, axis=-1)
    x = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
    return dense(params["proj_out"], x, "proj_out", tap)


def _check_inputs(c: FluxConfig, x, ctx, pooled, img_ids, txt_ids) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(f"flux.forward: {msg}")

    need(x.ndim == 3 and x.shape[-1] == c.in_channels * c.patch_size ** 2,
         f"hidden_states must be [B, N_img, {c.in_channels * c.patch_size ** 2}], got {tuple(x.shape)}")
    need(ctx.ndim == 3 and ctx.shape[0] == x.shape[0] and ctx.shape[-1] == c.joint_attention_dim,
         f"encoder_hidden_states must be [{x.shape[0]}, N_txt, {c.joint_attention_dim}], got {tuple(ctx.shape)}")
    need(pooled.ndim == 2 and pooled.shape == (x.shape[0], c.pooled_projection_dim),
         f"pooled_projections must be [{x.shape[0]}, {c.pooled_projection_dim}], got {tuple(pooled.shape)}")
    need(img_ids.shape[-2:] == (x.shape[1], len(c.axes_dims_rope)),
         f"img_ids must be [{x.shape[1]}, {len(c.axes_dims_rope)}], got {tuple(img_ids.shape)}")
    need(txt_ids.shape[-2:] == (ctx.shape[1], len(c.axes_dims_rope)),
         f"txt_ids must be [{ctx.shape[1]}, {len(c.axes_dims_rope)}], got {tuple(txt_ids.shape)}")
