"""Shared building blocks for the functional models: linear (float or quantized), norms, RoPE, embeddings.

A linear's params are ``{"kernel": [in, out], "bias": [out]}``. After ``pqjax.quantize`` the kernel is a packed
``pqjax.formats.QTensor``; the presence of ``"act_quant"`` (a :class:`pqjax.formats.ActQuant`) makes the layer
W4A4, its absence with a quantized kernel makes it weight-only W4A16. Both run through ``pallas_kernels``' dispatcher.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Tap = Optional[Callable[[str, jax.Array], None]]


def is_quantized(kernel) -> bool:
    return hasattr(kernel, "fmt") and hasattr(kernel, "codes")


def dense(p: dict, x: jax.Array, name: str = "", tap: Tap = None) -> jax.Array:
    """``x @ kernel + bias`` for float, W4A4 or W4A16 params; ``tap(name, x)`` sees the input (calibration)."""
    if tap is not None:
        tap(name, x)
    kernel, bias = p["kernel"], p.get("bias")
    if is_quantized(kernel):
        import pallas_kernels  # local import: float-only use never needs the kernels

        act = p.get("act_quant")
        if act is not None and act.smooth is not None:
            x = (x * act.smooth).astype(x.dtype)
        if act is None:
            return pallas_kernels.w4a16_matmul(x, kernel, bias=bias, out_dtype=x.dtype)
        return pallas_kernels.w4a4_matmul(x, kernel, bias=bias, act_global_scale=act.global_scale,
                                          hadamard=act.hadamard, out_dtype=x.dtype)
    if kernel.shape[0] != x.shape[-1]:
        raise ValueError(f"linear {name or '?'}: input has {x.shape[-1]} features, kernel expects {kernel.shape[0]}")
    y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (statistics in fp32)."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(p: dict, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * p["scale"].astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`` (fp32)."""
    half = dim // 2
    freqs = jnp.exp((-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / half)  # diffusers' op order
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(ids: jax.Array, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """FluxPosEmbed: per-axis 1-D rotary tables, interleaved (repeat_interleave), concatenated. ids: [S, n_axes]."""
    pos = ids.astype(jnp.float32)
    cos, sin = [], []
    for i, d in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        ang = pos[:, i:i + 1] * freqs[None, :]
        cos.append(jnp.repeat(jnp.cos(ang), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(ang), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, H, D]; rotates interleaved (real, imag) pairs like diffusers ``apply_rotary_emb(use_real_unbind_dim=-1)``."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
              scale: float | None = None) -> jax.Array:
    """``softmax(q k^T * scale + bias) v``, [B, S, H, D] in and out; ``bias`` broadcasts to [B, H, Sq, Sk] (T5's
    relative positions, CLIP's causal mask); ``scale`` defaults to ``1/sqrt(D)``. Logits and softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits = logits * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
