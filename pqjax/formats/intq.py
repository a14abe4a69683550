"""Symmetric per-group integer quantization (INT4: qmax = 7, INT3: qmax = 3), float32 arithmetic::

    s = scale_dtype(amax_group(|x|) * f32(1 / qmax))      then RNE to the scale dtype
    q = clip(round_half_even(x * (1 / f32(s))), -qmax, qmax)   (nvfp4.div_by_scale)
    x ~ q * s

Divisions are written as multiplications by IEEE f32 reciprocals, as in :mod:`.nvfp4`: that is
what XLA compiles ``x / s`` into anyway (``A / broadcast(B) -> A * (1 / B)``), so writing it out
keeps the numerics independent of jit / vmap / fusion and copyable by a kernel.  It differs from
exact ``round(x / s)`` only when ``x / s`` lies within about one f32 ulp of a .5 tie.

The scale is rounded to its storage dtype (bfloat16 by default) BEFORE ``q`` is computed, so
``q * s`` reproduces exactly what is stored.  The code -2^(b-1) (-8 / -4) is never produced.

* Zero groups (and groups whose scale underflows the scale dtype) get ``s = 0, q = 0``: exact +0.
* Scales are clipped to the scale dtype's finite max before the cast (matters for float16).
* A group holding NaN or +-Inf gets a NaN scale and codes 0, so it dequantizes to NaN.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .nvfp4 import div_by_scale

__all__ = ["INT_GROUP_SIZES", "INT_SCALE_DTYPES", "int_qmax", "int_group_quant", "int_group_dequant"]

INT_GROUP_SIZES = (32, 64, 128)
INT_SCALE_DTYPES = ("bfloat16", "float16", "float32")


def int_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def int_group_quant(x, bits: int, group_size: int, scale_dtype=jnp.bfloat16):
    """Quantize along the LAST axis in groups of ``group_size``.

    Returns ``(codes, scales)``: int8 codes ``[..., K]`` in ``[-qmax, qmax]`` and scales
    ``[..., K // group_size]`` of ``scale_dtype``.
    """
    x = jnp.asarray(x)
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"int_group_quant: last axis of shape {tuple(x.shape)} is not a multiple of {group_size}")
    sdt = jnp.dtype(scale_dtype)
    qmax = int_qmax(bits)
    xg = x.reshape(*x.shape[:-1], k // group_size, group_size).astype(jnp.float32)
    amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
    inv_qmax = np.float32(1) / np.float32(qmax)
    s = jnp.clip(amax * inv_qmax, 0.0, jnp.float32(jnp.finfo(sdt).max)).astype(sdt)
    finite = jnp.all(jnp.isfinite(xg), axis=-1, keepdims=True)
    s = jnp.where(finite, s, jnp.array(jnp.nan, sdt))
    sf = s.astype(jnp.float32)
    q = jnp.clip(jnp.round(div_by_scale(xg, sf)), -qmax, qmax)
    q = jnp.where(sf > 0, q, 0.0)  # zero and NaN scales -> code 0
    return q.astype(jnp.int8).reshape(x.shape), s[..., 0]


@functools.partial(jax.jit, static_argnames="dtype")
def int_group_dequant(codes, scales, dtype=jnp.float32):
    """Inverse of :func:`int_group_quant`: ``f32(codes) * f32(scales)`` per group, then cast."""
    codes = jnp.asarray(codes)
    scales = jnp.asarray(scales)
    k = codes.shape[-1]
    g = k // scales.shape[-1]
    q = codes.astype(jnp.float32).reshape(*codes.shape[:-1], k // g, g)
    return (q * scales.astype(jnp.float32)[..., None]).reshape(codes.shape).astype(dtype)
