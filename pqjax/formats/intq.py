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

Clip search (:func:`int_clip_search`, weights offline): per group, the scale is computed from a
clipped amax ``r * amax`` for each ratio ``r`` of a small grid (default 1.0 down to 0.7), every
candidate is encoded exactly as above, and the group keeps the ratio whose squared error
``sum_group (q * s - x)^2`` (f32) is lowest (the first, i.e. largest, ratio on a tie).  Values beyond
``r * amax`` saturate at +-qmax.  The output is an ordinary INT group quantization.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .nvfp4 import div_by_scale

__all__ = ["INT_GROUP_SIZES", "INT_SCALE_DTYPES", "DEFAULT_CLIP_GRID", "int_qmax", "int_group_quant",
           "int_group_dequant", "int_group_scale", "int_encode", "int_clip_search"]

INT_GROUP_SIZES = (32, 64, 128)
INT_SCALE_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def int_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def int_group_scale(amax, bits: int, scale_dtype=jnp.bfloat16, finite=None, clip_ratio=None):
    """Group scale ``scale_dtype(clip(amax [* clip_ratio] * f32(1 / qmax)))``; NaN where ``finite`` is False."""
    sdt = jnp.dtype(scale_dtype)
    a = jnp.asarray(amax, jnp.float32)
    if clip_ratio is not None:
        a = a * jnp.asarray(clip_ratio, jnp.float32)
    inv_qmax = np.float32(1) / np.float32(int_qmax(bits))
    s = jnp.clip(a * inv_qmax, 0.0, jnp.float32(jnp.finfo(sdt).max)).astype(sdt)
    return s if finite is None else jnp.where(finite, s, jnp.array(jnp.nan, sdt))


def int_encode(x, scale, bits: int):
    """f32 integer codes ``clip(round_half_even(x * (1 / scale)), -qmax, qmax)`` (0 where the scale is 0 or NaN).

    The elementwise half of :func:`int_group_quant` (``scale`` broadcasts against ``x``); GPTQ reuses it column
    by column under a group scale fixed when the group starts.
    """
    qmax = int_qmax(bits)
    sf = jnp.asarray(scale, jnp.float32)
    q = jnp.clip(jnp.round(div_by_scale(x, sf)), -qmax, qmax)
    return jnp.where(sf > 0, q, 0.0)  # zero and NaN scales -> code 0


def _split_groups(x, group_size, who):
    x = jnp.asarray(x)
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"{who}: last axis of shape {tuple(x.shape)} is not a multiple of {group_size}")
    return x.reshape(*x.shape[:-1], k // group_size, group_size).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def int_group_quant(x, bits: int, group_size: int, scale_dtype=jnp.bfloat16):
    """Quantize along the LAST axis in groups of ``group_size``.

    Returns ``(codes, scales)``: int8 codes ``[..., K]`` in ``[-qmax, qmax]`` and scales
    ``[..., K // group_size]`` of ``scale_dtype``.
    """
    xg = _split_groups(x, group_size, "int_group_quant")
    amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
    finite = jnp.all(jnp.isfinite(xg), axis=-1, keepdims=True)
    s = int_group_scale(amax, bits, scale_dtype, finite)
    q = int_encode(xg, s.astype(jnp.float32), bits)
    return q.astype(jnp.int8).reshape(jnp.shape(x)), s[..., 0]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype", "clip_grid"))
def int_clip_search(x, bits: int, group_size: int, scale_dtype=jnp.bfloat16, clip_grid=DEFAULT_CLIP_GRID):
    """:func:`int_group_quant` with the per-group MSE-best clip ratio from ``clip_grid`` (module doc).

    Returns ``(codes, scales, ratio_index)``; ``ratio_index [..., K // group_size]`` indexes ``clip_grid``.
    """
    grid = tuple(float(r) for r in clip_grid)
    if not grid or any(not 0.0 < r <= 1.0 for r in grid):
        raise ValueError(f"int_clip_search: clip ratios must lie in (0, 1], got {clip_grid}")
    xg = _split_groups(x, group_size, "int_clip_search")
    amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
    finite = jnp.all(jnp.isfinite(xg), axis=-1, keepdims=True)
    ratios = jnp.asarray(grid, jnp.float32).reshape((len(grid),) + (1,) * xg.ndim)
    s = int_group_scale(amax[None], bits, scale_dtype, finite[None], clip_ratio=ratios)  # [R, ..., ng, 1]
    sf = s.astype(jnp.float32)
    q = int_encode(xg[None], sf, bits)
    err = jnp.sum(jnp.square(q * sf - xg[None]), axis=-1)  # [R, ..., ng]
    best = jnp.argmin(err, axis=0)  # first minimum: the largest ratio on a tie
    pick = lambda a: jnp.take_along_axis(a, best[None, ..., None], axis=0)[0]
    q, s = pick(q), pick(s)
    return q.astype(jnp.int8).reshape(jnp.shape(x)), s[..., 0], best.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="dtype")
def int_group_dequant(codes, scales, dtype=jnp.float32):
    """Inverse of :func:`int_group_quant`: ``f32(codes) * f32(scales)`` per group, then cast."""
    codes = jnp.asarray(codes)
    scales = jnp.asarray(scales)
    k = codes.shape[-1]
    g = k // scales.shape[-1]
    q = codes.astype(jnp.float32).reshape(*codes.shape[:-1], k // g, g)
    return (q * scales.astype(jnp.float32)[..., None]).reshape(codes.shape).astype(dtype)
