"""Shared by the XLA references and the Triton kernels: argument checks; the Hadamard matrix is pqjax.formats'."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from pqjax.formats import FORMATS, NVFP4_BLOCK, QTensor, hadamard_matrix, int_qmax

__all__ = ["Problem", "check_args", "hadamard_matrix", "hadamard_block"]

_X_DTYPES = ("bfloat16", "float16", "float32")


class Problem(NamedTuple):
    """The validated, static description of one ``x[..., K] @ W[K, N]`` call."""

    fmt: str
    group: int  # block/group size along K (16 for nvfp4)
    k: int
    n: int
    m: int  # rows of x after flattening the leading dims
    lead: tuple  # x's leading dims
    out_dtype: jnp.dtype
    qmax: int  # INT formats; 0 for nvfp4


def hadamard_block(fmt: str, group: int) -> int:
    """Rotation block of PermuQuant-H: the quantization group (16 for nvfp4)."""
    return NVFP4_BLOCK if fmt == "nvfp4" else group


def check_args(x, w, bias, out_dtype, *, who: str, act_global_scale=None, need_act_scale=False) -> Problem:
    """Clear errors for bad inputs (shapes, dtypes, formats); returns the static :class:`Problem`."""
    if not isinstance(w, QTensor):
        raise TypeError(f"{who}: w must be a pqjax.formats.QTensor (a quantized Flax kernel [K, N]), "
                        f"got {type(w).__name__}")
    if w.fmt not in FORMATS:
        raise ValueError(f"{who}: unknown weight format {w.fmt!r}; expected one of {FORMATS}")
    if len(w.shape) != 2 or w.axis != 0:
        raise ValueError(f"{who}: w must be a 2-d kernel [K, N] quantized along axis=0 (K), got "
                         f"shape={w.shape}, axis={w.axis}")
    if w.batch_shape:
        raise ValueError(f"{who}: w is a stack of {w.batch_shape} kernels; index or lax.scan over it first")
    k, n = w.shape
    if k % w.group_size:
        raise ValueError(f"{who}: K={k} is not a multiple of the group size {w.group_size}")
    x_dt = jnp.dtype(x.dtype)
    if x_dt.name not in _X_DTYPES:
        raise TypeError(f"{who}: x must be bfloat16, float16 or float32, got {x_dt}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"{who}: x of shape {tuple(x.shape)} does not match the kernel [K={k}, N={n}] "
                         f"(last axis must be K)")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{who}: bias must have shape ({n},), got {tuple(bias.shape)}")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"{who}: bias must be floating point, got {bias.dtype}")
    out_dtype = x_dt if out_dtype is None else jnp.dtype(out_dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise TypeError(f"{who}: out_dtype must be floating point, got {out_dtype}")
    if need_act_scale and w.fmt == "nvfp4":
        if act_global_scale is None:
            raise ValueError(f"{who}: nvfp4 W4A4 needs the static activation global scale "
                             "act_global_scale (fp32 scalar from calibration)")
        if jnp.ndim(act_global_scale) != 0:
            raise ValueError(f"{who}: act_global_scale must be a scalar, got shape {jnp.shape(act_global_scale)}")
    lead = tuple(x.shape[:-1])
    qmax = 0 if w.fmt == "nvfp4" else int_qmax(4 if w.fmt == "int4" else 3)
    return Problem(w.fmt, w.group_size, k, n, int(math.prod(lead)), lead, out_dtype, qmax)
