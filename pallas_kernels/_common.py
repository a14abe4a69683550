"""Shared by the XLA references and the Triton kernels: argument checks; the Hadamard matrix is pqjax.formats'."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

import numpy as np

from pqjax.formats import (DEFAULT_INT_GROUP, FORMATS, INT_GROUP_SIZES, INT_SCALE_DTYPES, NVFP4_BLOCK, QTensor,
                           hadamard_matrix, int_qmax)

__all__ = ["Problem", "ActProblem", "check_args", "check_quantize_args", "check_packed_args", "hadamard_matrix",
           "hadamard_block"]

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


class ActProblem(NamedTuple):
    """The validated, static description of one :func:`pallas_kernels.quantize_activation` call."""

    fmt: str
    group: int
    k: int
    m: int
    lead: tuple
    x_dtype: jnp.dtype
    scale_dtype: jnp.dtype  # e4m3 for nvfp4, the INT scale dtype otherwise
    qmax: int


def _concrete(a):
    """``a`` as a numpy array if it is concrete (not traced under jit), else None."""
    try:
        return np.asarray(a)
    except Exception:  # a tracer
        return None


def check_quantize_args(x, fmt, *, global_scale, perm, hadamard, smooth, group_size, scale_dtype,
                        who: str = "quantize_activation") -> ActProblem:
    """Clear one-line errors for bad activation-quantize inputs; returns the static :class:`ActProblem`.

    Values (a permutation that is not one, a global scale that is 0 / negative / not finite) can only be
    checked when they are concrete; traced values are checked for shape and dtype only (a bad traced
    global scale then gives NaN block scales, i.e. an all-NaN result, never plausible numbers).
    """
    if fmt not in FORMATS:
        raise ValueError(f"{who}: unknown format {fmt!r}; expected one of {FORMATS}")
    x_dt = jnp.dtype(x.dtype)
    if x_dt.name not in _X_DTYPES:
        raise TypeError(f"{who}: x must be bfloat16, float16 or float32, got {x_dt}")
    if x.ndim < 1:
        raise ValueError(f"{who}: x must have at least one dimension (K last), got a scalar")
    k = int(x.shape[-1])
    if fmt == "nvfp4":
        if group_size not in (None, NVFP4_BLOCK):
            raise ValueError(f"{who}: nvfp4 uses blocks of {NVFP4_BLOCK}, got group_size={group_size}")
        group = NVFP4_BLOCK
        if scale_dtype is not None and jnp.dtype(scale_dtype) != jnp.dtype(jnp.float8_e4m3fn):
            raise ValueError(f"{who}: nvfp4 scales are float8_e4m3fn, got scale_dtype={scale_dtype}")
        sdt = jnp.dtype(jnp.float8_e4m3fn)
        if global_scale is None:
            raise ValueError(f"{who}: nvfp4 needs the static activation global scale (fp32 scalar from "
                             f"calibration) for x of shape {tuple(x.shape)}")
        if jnp.ndim(global_scale) != 0:
            raise ValueError(f"{who}: global_scale must be a scalar, got shape {jnp.shape(global_scale)}")
        g = _concrete(global_scale)
        if g is not None and not (np.isfinite(g) and g > 0):
            raise ValueError(f"{who}: global_scale must be finite and > 0, got {float(g)!r} "
                             f"(x of shape {tuple(x.shape)})")
    else:
        group = DEFAULT_INT_GROUP if group_size is None else int(group_size)
        if group not in INT_GROUP_SIZES:
            raise ValueError(f"{who}: {fmt} group_size must be one of {INT_GROUP_SIZES}, got {group}")
        if global_scale is not None:
            raise ValueError(f"{who}: global_scale applies to nvfp4 only, not {fmt}")
        sdt = jnp.dtype(jnp.bfloat16 if scale_dtype is None else scale_dtype)
        if sdt.name not in INT_SCALE_DTYPES:
            raise ValueError(f"{who}: {fmt} scale_dtype must be one of {INT_SCALE_DTYPES}, got {sdt}")
    if k == 0 or k % group or (fmt == "int3" and k % 8):
        raise ValueError(f"{who}: x of shape {tuple(x.shape)}: K={k} must be a positive multiple of the "
                         f"{fmt} group size {group}")
    if perm is not None:
        if tuple(jnp.shape(perm)) != (k,):
            raise ValueError(f"{who}: perm must have shape ({k},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(jnp.shape(perm))}")
        if not jnp.issubdtype(jnp.result_type(perm), jnp.integer):
            raise TypeError(f"{who}: perm must be integer, got {jnp.result_type(perm)}")
        pv = _concrete(perm)
        if pv is not None and not np.array_equal(np.sort(pv), np.arange(k)):
            bad = sorted(set(range(k)) - set(pv.tolist()))[:5]
            raise ValueError(f"{who}: perm of length {k} is not a permutation of 0..{k - 1} "
                             f"(missing e.g. {bad})")
    if smooth is not None and tuple(jnp.shape(smooth)) != (k,):
        raise ValueError(f"{who}: smooth must have shape ({k},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(jnp.shape(smooth))}")
    if hadamard not in (True, False):
        raise TypeError(f"{who}: hadamard must be a bool, got {hadamard!r}")
    lead = tuple(x.shape[:-1])
    qmax = 0 if fmt == "nvfp4" else int_qmax(4 if fmt == "int4" else 3)
    return ActProblem(fmt, group, k, int(math.prod(lead)), lead, x_dt, sdt, qmax)


def check_packed_args(xq, w, bias, out_dtype, *, who: str) -> Problem:
    """Checks for the packed x packed GEMM ``xq [..., K] @ w [K, N]`` (both QTensors)."""
    if not isinstance(xq, QTensor):
        raise TypeError(f"{who}: xq must be a pqjax.formats.QTensor from quantize_activation, got {type(xq).__name__}")
    if not isinstance(w, QTensor):
        raise TypeError(f"{who}: w must be a pqjax.formats.QTensor (a quantized Flax kernel [K, N]), "
                        f"got {type(w).__name__}")
    if len(w.shape) != 2 or w.axis != 0 or w.batch_shape:
        raise ValueError(f"{who}: w must be one 2-d kernel [K, N] quantized along axis=0, got shape={w.shape}, "
                         f"axis={w.axis}, stack={w.batch_shape}")
    if xq.axis != len(xq.shape) - 1 or xq.batch_shape:
        raise ValueError(f"{who}: xq must be quantized along its last axis (K), got shape={xq.shape}, axis={xq.axis}")
    k, n = w.shape
    if xq.fmt != w.fmt or xq.group_size != w.group_size:
        raise ValueError(f"{who}: xq is {xq.fmt} (group {xq.group_size}) of shape {xq.shape} but w is {w.fmt} "
                         f"(group {w.group_size}) of shape {w.shape}; both operands must share format and group")
    if xq.shape[-1] != k:
        raise ValueError(f"{who}: xq of shape {xq.shape} does not match the kernel [K={k}, N={n}] "
                         "(last axis must be K)")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{who}: bias must have shape ({n},), got {tuple(bias.shape)}")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"{who}: bias must be floating point, got {bias.dtype}")
    out_dtype = jnp.dtype(xq.dtype if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise TypeError(f"{who}: out_dtype must be floating point, got {out_dtype}")
    lead = tuple(xq.shape[:-1])
    qmax = 0 if w.fmt == "nvfp4" else int_qmax(4 if w.fmt == "int4" else 3)
    return Problem(w.fmt, w.group_size, k, n, int(math.prod(lead)), lead, out_dtype, qmax)
