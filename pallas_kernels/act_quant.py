"""Pallas Triton kernel for the activation-quantize pass: ONE read of x, packed codes + scales out.

``quantize_activation(x, fmt, ...)`` (same arguments and bits as
:func:`pallas_kernels.reference.quantize_activation`) runs a grid of programs over ``[rows, K tiles]``.
A tile covers ``w`` groups (NVFP4 blocks of 16, INT groups of g) of ``bm`` rows and is held as ``g``
*planes* ``[bm, w]``: plane ``j`` holds element ``j`` of every group.  Then every per-group step is
plain elementwise arithmetic (no reshapes, no reductions across threads):

* the gather is fused: the tile is loaded straight from ``x[rows, perm[tile columns]]`` (a pointer
  gather, which Triton does natively), or as a plain vectorized load without a permutation; the planes
  are split out of it in registers;
* smoothing ``(x * smooth).astype(x.dtype)`` per plane; the Hadamard rotation is the butterfly
  :func:`pallas_kernels._numerics.fwht` across planes (log2(g) adds per element);
* the group amax is a max across planes; the scale arithmetic runs once per group; e2m1 / INT codes
  come from bit patterns (:func:`~pallas_kernels._numerics.e2m1_code`, :func:`~pallas_kernels._numerics.rint_small`);
* codes are packed pairwise and interleaved back into one contiguous byte tile (int3: 8 codes per 3
  bytes, stored as byte planes).

Divisions follow :mod:`pqjax.formats` exactly: ``x * (1 / s)`` with a correctly rounded reciprocal
(``div.rn.f32`` on CUDA, an IEEE division in interpret mode), so codes and scales are bit-identical to
the reference.  Rows are masked (no padding copy of x).  ``four_over_six`` (issue 12: per block, the
e4m3 scale mapping the amax to 6 or to 4, whichever quantizes the block better) has its hook in
:func:`_nvfp4_group_quant`; it is not implemented yet and raises NotImplementedError.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pqjax.formats import E4M3_MAX, QTensor

from . import _numerics as nm
from ._common import ActProblem, check_quantize_args, hadamard_block

__all__ = ["quantize_activation", "act_tiles"]

_F32 = jnp.float32
_I32 = jnp.int32
_TARGET_ELEMS = 4096  # f32 values per program tile (32 per thread at 4 warps: no spills)


def act_tiles(p: ActProblem):
    """``(bm, w, num_warps)``: rows per program, groups per program (plane width), warps."""
    ngroups = p.k // p.group
    w = 1
    while w < 16 and ngroups % (2 * w) == 0:
        w *= 2
    bm = max(1, min(_TARGET_ELEMS // (w * p.group), 64))
    mp2 = 1
    while mp2 < p.m:
        mp2 *= 2
    return min(bm, mp2), w, 4


def _amax_bad(v):
    """Per column: (max |v_j| as float32, True where any v_j is Inf/NaN), from the integer bits of |v_j|.

    For non-negative floats the int32 order of the bits is the float order, and Inf / NaN bits exceed
    every finite one: one AND and one integer max per element give both.
    """
    ab = functools.reduce(jnp.maximum, [lax.bitcast_convert_type(x, _I32) & 0x7FFFFFFF for x in v])
    return lax.bitcast_convert_type(ab, _F32), ab > 0x7F7FFFFF


def _nvfp4_group_quant(v, rgc, dm, four_over_six=False):
    """Planes ``v[j]`` (float32, one NVFP4 block per column) -> (int32 code planes, int32 e4m3 scale bits,
    (zero-scale, NaN-scale) masks: the caller forces those blocks' packed bytes to 0x00 / 0x88).

    ``formats.nvfp4_block_quant``: ``x' = (x * c) * rg`` - evaluated as ``x * (c * rg)`` with ``rgc = c * rg``
    (equal: ``c`` is 1, or 2^-64 for a global scale >= 2^64, where the two differ only for |x| < 2^-62, whose
    codes are 0 / 0x8 either way) -, ``s = e4m3(clip(amax(x') * f32(1/6), 0, 448))`` with
    ``amax(x') = amax(x) * rgc`` (rounding is monotone), ``q = e2m1(clip(x' * (1/s), -6, 6))``; zero scale ->
    code 0; non-finite block -> NaN scale, codes 0x8.
    """
    if four_over_six:
        raise NotImplementedError("four_over_six block scales (issue 12) are not implemented in the kernel yet")
    amax, bad = _amax_bad(v)
    s = nm.round_e4m3(nm.clip((amax * rgc) * np.float32(1 / np.float32(6)), 0.0, E4M3_MAX))
    s = jnp.where(bad | (rgc != rgc), jnp.nan, s)  # invalid global scale: rgc is NaN
    rs = nm.div(jnp.ones_like(s), s, dm)
    codes = [nm.e2m1_code(nm.clip((x * rgc) * rs, -6.0, 6.0)) for x in v]
    return codes, nm.e4m3_code(s), (s == 0.0, s != s)


def _int_group_quant(v, qmax, sdt, dm):
    """Planes ``v[j]`` (float32, one INT group per column) -> (int32 code planes, scales in ``sdt``).

    ``formats.int_group_quant``: ``s = sdt(clip(amax * f32(1/qmax), 0, max(sdt)))``, ``q = clip(round(x * (1/s)))``
    (``div_by_scale``), zero / NaN scale -> code 0; non-finite group -> NaN scale.
    """
    amax, bad = _amax_bad(v)
    s = nm.clip(amax * np.float32(1 / np.float32(qmax)), 0.0, float(jnp.finfo(sdt).max)).astype(sdt)
    s = jnp.where(bad, jnp.array(jnp.nan, sdt), s)
    sf = s.astype(_F32)
    c = jnp.where(jnp.abs(sf) >= 2.0 ** 64, 2.0 ** -64, 1.0)
    rs = nm.div(jnp.ones_like(sf), sf * c, dm)
    codes = []
    for x in v:
        y = (x * c) * rs
        q = nm.rint_small(nm.clip(y, -float(qmax), float(qmax)))
        codes.append(jnp.where((sf > 0) & (y == y), q, 0))
    return codes, s


def _pack(codes, fmt):
    """Code planes -> byte planes in storage order (4-bit: pairs; int3: 8 codes -> 3 bytes)."""
    if fmt != "int3":
        return [(codes[2 * i] & 15) | ((codes[2 * i + 1] & 15) << 4) for i in range(len(codes) // 2)]
    out = []
    for t in range(len(codes) // 8):
        word = functools.reduce(jnp.bitwise_or, [(codes[8 * t + i] & 7) << (3 * i) for i in range(8)])
        out += [word & 255, (word >> 8) & 255, (word >> 16) & 255]
    return out


def _interleave(planes):
    """``n`` (a power of 2) planes ``[R, w]`` -> ``[R, n * w]`` with ``out[:, n * i + j] = planes[j][:, i]``."""
    if len(planes) == 1:
        return planes[0]
    even, odd = _interleave(planes[0::2]), _interleave(planes[1::2])  # even[:, h*i + a] = planes[2a][:, i]
    r, n = even.shape
    return jnp.stack([even, odd], axis=-1).reshape(r, 2 * n)


def _kernel(*refs, p: ActProblem, bm: int, w: int, has_perm: bool, has_smooth: bool, hadamard: bool, dm: str):
    refs = list(refs)
    sc_ref = refs.pop()
    c_ref = refs.pop()
    gs_ref = refs.pop(0) if p.fmt == "nvfp4" else None
    x_ref = refs.pop(0)
    idx_ref = refs.pop(0) if has_perm else None
    sm_ref = refs.pop(0) if has_smooth else None
    g = p.group
    i, t = pl.program_id(0), pl.program_id(1)
    rows = i * bm + lax.broadcasted_iota(_I32, (bm, w), 0)
    mask = rows < p.m
    grp = t * w + lax.broadcasted_iota(_I32, (bm, w), 1)  # group index of each column

    # One load of the tile [bm, w * g] (vectorized without a permutation, a pointer gather with one), then the
    # planes split out of it: Triton has no strided value slices, but a power-of-2 split of [bm, w, g] lowers.
    rows_t = i * bm + lax.broadcasted_iota(_I32, (bm, w * g), 0)
    if has_perm:
        cols_t = jnp.broadcast_to(idx_ref[pl.ds(t * (w * g), w * g)][None, :], (bm, w * g))
    else:
        cols_t = t * (w * g) + lax.broadcasted_iota(_I32, (bm, w * g), 1)
    tile = plt.load(x_ref.at[rows_t, cols_t], mask=rows_t < p.m)  # masked rows are never stored
    raw = [a.reshape(bm, w) for a in jnp.split(tile.reshape(bm, w, g), g, axis=2)]
    planes = []
    for j, x in enumerate(raw):
        x = x.astype(_F32)
        if has_smooth:
            sm = sm_ref[pl.ds(t * (w * g) + j, w, stride=g)].astype(_F32)
            x = (x * sm[None, :]).astype(p.x_dtype).astype(_F32)
        planes.append(x)
    if hadamard:
        planes = [y * np.float32(1.0 / float(g) ** 0.5) for y in nm.fwht(planes)]

    if p.fmt == "nvfp4":
        gx = jnp.full((bm, w), gs_ref[0], _F32)
        c = jnp.where(jnp.abs(gx) >= 2.0 ** 64, 2.0 ** -64, 1.0)
        rgc = nm.div(jnp.ones_like(gx), gx * c, dm) * c
        rgc = jnp.where((gx > 0) & (gx <= 3.4028235e38), rgc, jnp.nan)
        codes, scales, (zero, nan) = _nvfp4_group_quant(planes, rgc, dm)
        scales = scales.astype(jnp.uint8)
    else:
        codes, scales = _int_group_quant(planes, p.qmax, p.scale_dtype, dm)
        zero = nan = None
    plt.store(sc_ref.at[rows, grp], scales, mask=mask)
    nb = len(codes) // 2 if p.fmt != "int3" else 3 * len(codes) // 8  # bytes per group
    bytes_ = _pack(codes, p.fmt)
    if zero is not None:  # per byte, not per code: zero-scale blocks -> 0x00, NaN-scale blocks -> 0x88
        bytes_ = [jnp.where(zero, 0, jnp.where(nan, 0x88, b)) for b in bytes_]
    bytes_ = [b.astype(jnp.uint8) for b in bytes_]
    if nb & (nb - 1) == 0:  # 4-bit formats: one contiguous store of the tile's bytes (joins, no scatter)
        rows_t = i * bm + lax.broadcasted_iota(_I32, (bm, w * nb), 0)
        cols_t = t * (w * nb) + lax.broadcasted_iota(_I32, (bm, w * nb), 1)
        plt.store(c_ref.at[rows_t, cols_t], _interleave(bytes_), mask=rows_t < p.m)
    else:  # int3: 3 bytes per 8 codes, stored as byte planes
        for b, byte in enumerate(bytes_):
            plt.store(c_ref.at[rows, grp * nb + b], byte, mask=mask)


def quantize_activation(x, fmt, *, global_scale=None, perm=None, hadamard=False, smooth=None, group_size=None,
                        scale_dtype=None, interpret=False):
    """Pallas kernel; same arguments, result and bits as :func:`pallas_kernels.reference.quantize_activation`."""
    p = check_quantize_args(x, fmt, global_scale=global_scale, perm=perm, hadamard=hadamard, smooth=smooth,
                            group_size=group_size, scale_dtype=scale_dtype)
    if fmt != "nvfp4" and hadamard and hadamard_block(fmt, p.group) != p.group:
        raise NotImplementedError("INT Hadamard blocks other than the group size")
    bm, w, nw = act_tiles(p)
    g = p.group
    dm = "ieee" if interpret else "rn"
    x2 = x.reshape(p.m, p.k)
    args = []
    if fmt == "nvfp4":
        args.append(jnp.asarray(global_scale, _F32).reshape(1))
    args.append(x2)
    if perm is not None:  # the site's column order, read with a stride of g per plane
        args.append(jnp.asarray(perm, _I32))
    if smooth is not None:
        args.append(jnp.asarray(smooth, _F32))
    nbytes = p.k // 2 if fmt != "int3" else 3 * p.k // 8
    sdt = jnp.uint8 if fmt == "nvfp4" else p.scale_dtype
    kernel = functools.partial(_kernel, p=p, bm=bm, w=w, has_perm=perm is not None, has_smooth=smooth is not None,
                               hadamard=bool(hadamard), dm=dm)
    tag = fmt + (f"g{g}" if fmt != "nvfp4" else "")
    codes, scales = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((p.m, nbytes), jnp.uint8), jax.ShapeDtypeStruct((p.m, p.k // g), sdt)),
        grid=(-(-p.m // bm), p.k // (w * g)),
        compiler_params=plt.CompilerParams(num_warps=nw, num_stages=1),
        interpret=interpret,
        name=f"quantize_act_{tag}{'_perm' if perm is not None else ''}{'_had' if hadamard else ''}",
    )(*args)
    if fmt == "nvfp4":
        scales = lax.bitcast_convert_type(scales, jnp.float8_e4m3fn)
        gs = jnp.asarray(global_scale, _F32)
    else:
        gs = None
    return QTensor(codes.reshape(*p.lead, nbytes), scales.reshape(*p.lead, p.k // g), gs, fmt=fmt, group_size=g,
                   shape=tuple(x.shape), axis=x.ndim - 1, dtype=p.x_dtype.name)
