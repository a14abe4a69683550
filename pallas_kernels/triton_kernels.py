"""Pallas kernels (Triton backend): the packed x packed W4A4 GEMM and the W4A16 GEMM.

One program computes an output tile ``[bm, bn]`` over a range of K (``split_k`` > 1 splits K over a third
grid axis; fp32 partial sums are reduced by XLA).  Per K step:

* W4A4 nvfp4: both operands arrive packed (``xq`` from :func:`pallas_kernels.quantize_activation`, the weight
  QTensor).  Each is decoded into a low-nibble and a high-nibble fp16 plane (:mod:`pallas_kernels._decode`:
  PTX on 4 bytes per register, ``q * s * 2^-14`` exact), and ``acc += lo_x @ lo_w.T + hi_x @ hi_w.T`` (fp16
  MMA, fp32 accumulation).  Epilogue ``(acc * 2^28) * (gx * gw) + bias``.
* W4A4 int4 (int3): per group, ``16 * code`` int8 planes (int3: the codes themselves), s8 x s8 -> s32 MMA
  (exact), then ``acc += f32(acc_i) * ((sx * 2^-8) * sw)``.  The int32 -> f32 conversion is free: the MMA
  accumulates onto the bits of 1.5 * 2^23, so ``bitcast(acc_i) - 1.5 * 2^23`` is the dot exactly
  (|dot| < 2^22); no I2F.  Scales arrive as float32 ``[groups, rows]`` (one contiguous row per step).
* W4A16: the weight planes as above against the matching even / odd columns of x (nvfp4; bf16 x gets the
  fp16 plane converted to bf16, exact), INT per group with ``acc += (x_g @ q_g.T) * sw``; float32 x decodes to
  float32 and uses IEEE fp32 dots.

Formulations are equal to :mod:`pallas_kernels.reference` up to fp32 accumulation order.  M is padded to
the row block (zero rows: exact zeros) and sliced off again.  Shapes a kernel cannot serve raise
``NotImplementedError`` (the dispatcher then uses the reference).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pqjax.formats import QTensor

from . import _decode as dec
from . import _numerics as nm
from . import act_quant
from ._common import Problem, check_args, check_packed_args

__all__ = ["Blocks", "choose_blocks", "split_k_rule", "w4a4_matmul", "w4a16_matmul", "NUM_SMS"]

_F32 = jnp.float32
_F16 = jnp.float16
_NT = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]
_HI = lax.Precision.HIGHEST
NUM_SMS = 132  # H100 / H200: the grid should have at least this many programs
_MAGIC = 12582912.0  # 1.5 * 2^23: bitcast(i + 0x4B400000) - this == float(i) exactly for |i| < 2^22
_MAGIC_BITS = 0x4B400000


@dataclasses.dataclass(frozen=True)
class Blocks:
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    split_k: int = 1


def _pow2_at_least(n: int, lo: int = 16) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


def split_k_rule(tiles: int, k_steps: int, *, min_steps: int = 2) -> int:
    """Smallest power-of-2 K split giving ``>= NUM_SMS`` programs, keeping ``>= min_steps`` K steps per split."""
    s = 1
    while tiles * s < NUM_SMS and k_steps % (2 * s) == 0 and k_steps // (2 * s) >= min_steps:
        s *= 2
    return s


def choose_blocks(p: Problem, *, w4a4: bool, x_dtype=None, block_m=None, block_n=None, block_k=None,
                  num_warps=None, num_stages=None, split_k=None) -> Blocks:
    """Tile sizes for one problem from a small static table (overrides win); split-K for small grids.

    From the static K-loop budget (``python -m pallas_kernels.gpu_check --budget``) and ptxas register counts
    on sm_90: nvfp4 W4A4 / W4A16 use 128x256 tiles with 8 warps (the decode of a 256-wide weight tile
    amortizes over 128 rows and vice versa), INT kernels 128x128 (a second, int32 / per-group accumulator
    must fit).  Small M gets 64-row tiles with 4 warps (M <= 64; fewer rows pad to 16) and split-K.
    """
    if p.n % 16:
        raise NotImplementedError(f"N={p.n} is not a multiple of 16 (Triton block dims are powers of 2 >= 16)")
    if p.fmt == "nvfp4":
        bk = block_k or next((c for c in (64, 32) if p.k % c == 0), None)
        if bk is None or p.k % bk or bk & (bk - 1) or bk < 32:
            raise NotImplementedError(f"nvfp4 K={p.k} needs a power-of-2 block_k >= 32 dividing it (got {bk})")
    else:
        bk = block_k or p.group
        if bk % p.group or p.k % bk:
            raise NotImplementedError(f"INT kernels step K by whole groups ({p.group}) dividing K={p.k}, "
                                      f"got block_k={bk}")
    wide = p.fmt == "nvfp4" and (w4a4 or jnp.dtype(x_dtype).itemsize == 2)
    small = p.m <= 64
    bm = block_m or (_pow2_at_least(p.m) if small else 128)
    if block_n:
        bn = block_n
    elif small:
        bn = next(c for c in (128, 64, 32, 16) if p.n % c == 0)
    else:
        bn = next(c for c in ((256, 128, 64, 32, 16) if wide else (128, 64, 32, 16)) if p.n % c == 0)
    if bm < 16 or bm & (bm - 1):
        raise NotImplementedError(f"block_m={bm} must be a power of 2 >= 16")
    if bn < 16 or bn & (bn - 1) or p.n % bn:
        raise NotImplementedError(f"block_n={bn} must be a power of 2 >= 16 dividing N={p.n}")
    if num_warps is None:
        num_warps = 8 if bm * bn >= 128 * 128 else 4
    if num_stages is None:
        num_stages = 2 if bm * bn > 128 * 128 else 3
    k_steps = p.k // bk
    if split_k is None:
        split_k = split_k_rule(-(-p.m // bm) * (p.n // bn), k_steps)
    if split_k < 1 or k_steps % split_k:
        raise NotImplementedError(f"split_k={split_k} must divide the {k_steps} K steps")
    return Blocks(bm, bn, bk, num_warps, num_stages, split_k)


# --------------------------------------------------------------------------------------------
# in-kernel operand decoding
# --------------------------------------------------------------------------------------------
def _bcast_groups(s, width):
    """``s [R, G]`` -> ``[R, G * width]`` with each entry repeated ``width`` times."""
    r, g = s.shape
    return jnp.broadcast_to(s[:, :, None], (r, g, width)).reshape(r, g * width)


def _nvfp4_planes(c_ref, s_ref, k, bk, asm):
    """K step ``k`` of packed nvfp4 rows -> (lo, hi) fp16 planes ``[R, bk/2]`` of ``q * s * 2^-14``."""
    c = c_ref[:, pl.ds(pl.multiple_of(k * (bk // 2), bk // 2), bk // 2)]
    s16 = dec.e4m3_to_f16(s_ref[:, pl.ds(k * (bk // 16), bk // 16)])  # decoded once per block
    return dec.nvfp4_planes(c, _bcast_groups(s16, 8), asm=asm)


def _int_codes(c_ref, k, g, fmt):
    """Packed INT codes of group ``k`` -> int32 codes ``[R, g]`` in storage order (sign-extended)."""
    if fmt == "int4":
        c = c_ref[:, pl.ds(pl.multiple_of(k * (g // 2), g // 2), g // 2)].astype(jnp.int32)
        return nm.interleave2(((c & 15) ^ 8) - 8, ((c >> 4) ^ 8) - 8)
    nw = g // 8  # 24-bit words per group
    base = k * (3 * nw)
    b = [c_ref[:, pl.ds(base + i, nw, stride=3)].astype(jnp.int32) for i in range(3)]
    word = b[0] | (b[1] << 8) | (b[2] << 16)
    return nm.interleave8([(((word >> (3 * j)) & 7) ^ 4) - 4 for j in range(8)])


def _int_operand_s8(c_ref, k, g, fmt, asm):
    """Group ``k`` -> int8 MMA operand planes: int4 ``16 * code`` (lo, hi nibbles), int3 the codes."""
    if fmt == "int4":
        c = c_ref[:, pl.ds(pl.multiple_of(k * (g // 2), g // 2), g // 2)]
        lo, hi = dec.int4_planes_s8(c, asm=asm)
        if g // 2 >= 32:  # int8 MMA needs K >= 32 per operand
            return [lo, hi]
        return [nm.interleave2(lo, hi)]
    return [_int_codes(c_ref, k, g, fmt).astype(jnp.int8)]


def _dot(a, b, cdt):
    if cdt == _F32:
        return lax.dot_general(a, b, _NT, precision=_HI, preferred_element_type=_F32)
    return lax.dot_general(a, b, _NT, preferred_element_type=_F32)


def _split_even_odd(x):
    """``[R, 2n]`` -> (even columns, odd columns) ``[R, n]`` each (a reshape + the size-2 split)."""
    r, k2 = x.shape
    xe, xo = jnp.split(x.reshape(r, k2 // 2, 2), 2, axis=2)
    return xe.reshape(r, k2 // 2), xo.reshape(r, k2 // 2)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
def _k_range(blk, nk):
    s = pl.program_id(2)
    per = nk // blk.split_k
    return s * per, (s + 1) * per


def _w4a4_kernel(*refs, p: Problem, blk: Blocks, has_bias: bool, asm: bool):
    refs = list(refs)
    o_ref = refs.pop()
    gs_ref = refs.pop(0) if p.fmt == "nvfp4" else None
    xc_ref, xs_ref, wc_ref, ws_ref = refs[:4]
    b_ref = refs[4] if has_bias else None
    bm, bn, bk = blk.bm, blk.bn, blk.bk
    lo_k, hi_k = _k_range(blk, p.k // bk)

    if p.fmt == "nvfp4":
        def body(k, acc):
            xlo, xhi = _nvfp4_planes(xc_ref, xs_ref, k, bk, asm)
            wlo, whi = _nvfp4_planes(wc_ref, ws_ref, k, bk, asm)
            return acc + _dot(xlo, wlo, _F16) + _dot(xhi, whi, _F16)
    else:
        magic = jnp.full((bm, bn), _MAGIC_BITS, jnp.int32)

        g, gps = p.group, bk // p.group

        def body(k, acc):
            for gi in range(gps):  # one rescale per group; several groups per step amortize the loop overhead
                kg = k * gps + gi
                xo = _int_operand_s8(xc_ref, kg, g, p.fmt, asm)
                wo = _int_operand_s8(wc_ref, kg, g, p.fmt, asm)
                # the int32 MMA accumulates onto the bits of 1.5 * 2^23: bitcast(.) - 1.5 * 2^23 == float(dot)
                acc_i = functools.reduce(lambda c, ab: c + lax.dot_general(ab[0], ab[1], _NT,
                                                                           preferred_element_type=jnp.int32),
                                         zip(xo, wo), magic)
                sx = xs_ref[kg, :]  # float32 scales, transposed to [groups, rows] outside (x's carry the 2^-8)
                sw = ws_ref[kg, :]
                acc = acc + (lax.bitcast_convert_type(acc_i, _F32) - _MAGIC) * (sx[:, None] * sw[None, :])
            return acc

    acc = lax.fori_loop(lo_k, hi_k, body, jnp.zeros((bm, bn), _F32))
    if blk.split_k > 1:
        o_ref[...] = acc
        return
    if p.fmt == "nvfp4":
        acc = (acc * np.float32(2.0 ** 28)) * (gs_ref[0] * gs_ref[1])
    if has_bias:
        acc = acc + b_ref[...].astype(_F32)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _w4a16_kernel(*refs, p: Problem, blk: Blocks, has_bias: bool, asm: bool, cdt):
    refs = list(refs)
    o_ref = refs.pop()
    gs_ref = refs.pop(0) if p.fmt == "nvfp4" else None
    x_ref, wc_ref, ws_ref = refs[:3]
    b_ref = refs[3] if has_bias else None
    bm, bn, bk = blk.bm, blk.bn, blk.bk
    lo_k, hi_k = _k_range(blk, p.k // bk)

    def x_tile(k):
        return x_ref[:, pl.ds(pl.multiple_of(k * bk, bk), bk)]

    if p.fmt == "nvfp4":
        def body(k, acc):
            if cdt == _F32:
                w = nm.interleave2(*[v.astype(_F32) for v in _nvfp4_planes(wc_ref, ws_ref, k, bk, False)])
                return acc + _dot(x_tile(k).astype(_F32), w, _F32)
            wlo, whi = _nvfp4_planes(wc_ref, ws_ref, k, bk, asm)
            xe, xo = _split_even_odd(x_tile(k))
            if cdt != _F16:  # bf16 x: the fp16 values q*s*2^-14 (>= 2^-24) are exact bf16 normals
                wlo, whi = wlo.astype(cdt), whi.astype(cdt)
            return acc + _dot(xe, wlo, cdt) + _dot(xo, whi, cdt)
    else:
        g, gps = p.group, bk // p.group

        def body(k, acc):
            for gi in range(gps):
                kg = k * gps + gi
                q = _int_codes(wc_ref, kg, g, p.fmt).astype(cdt)
                sw = ws_ref[kg, :]  # float32, transposed to [groups, N] outside
                x = x_ref[:, pl.ds(pl.multiple_of(kg * g, g), g)].astype(cdt)
                acc = acc + _dot(x, q, cdt) * sw[None, :]
            return acc

    acc = lax.fori_loop(lo_k, hi_k, body, jnp.zeros((bm, bn), _F32))
    if blk.split_k > 1:
        o_ref[...] = acc
        return
    if p.fmt == "nvfp4":
        acc = acc * (np.float32(2.0 ** 14) * gs_ref[1])  # every path decodes q * s * 2^-14
    if has_bias:
        acc = acc + b_ref[...].astype(_F32)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _launch(kernel, args, specs, p, blk, name, interpret):
    """pallas_call over (M tiles, N tiles, K splits); split-K writes fp32 partials ``[S, Mp, N]``."""
    mp = -(-p.m // blk.bm) * blk.bm
    grid = (mp // blk.bm, p.n // blk.bn, blk.split_k)
    if blk.split_k > 1:
        out_shape = jax.ShapeDtypeStruct((blk.split_k, mp, p.n), _F32)
        out_spec = pl.BlockSpec((None, blk.bm, blk.bn), lambda i, j, s: (s, i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((mp, p.n), p.out_dtype)
        out_spec = pl.BlockSpec((blk.bm, blk.bn), lambda i, j, s: (i, j))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=specs, out_specs=out_spec,
        compiler_params=plt.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=interpret, name=name,
    )(*args)


def _finish(out, p, blk, bias, scale):
    """Split-K: reduce the partials, then ``* scale + bias`` (as the kernel's own epilogue); slice padded rows."""
    if blk.split_k > 1:
        acc = jnp.sum(out, axis=0)
        if scale is not None:
            acc = scale(acc)
        if bias is not None:
            acc = acc + bias.astype(_F32)[None, :]
        out = acc.astype(p.out_dtype)
    if out.shape[0] != p.m:
        out = out[: p.m]
    return out.reshape(*p.lead, p.n)


def _pad_rows(a, mp):
    return a if a.shape[0] == mp else jnp.pad(a, ((0, mp - a.shape[0]), (0, 0)))


def _scales_u8(s):
    return lax.bitcast_convert_type(s, jnp.uint8) if s.dtype == jnp.float8_e4m3fn else s


def _global_scales(xq, w):
    gx = jnp.ones((), _F32) if xq is None else jnp.asarray(xq.global_scale, _F32)
    return jnp.stack([gx, jnp.asarray(w.global_scale, _F32)])


def w4a4_packed(xq, w, *, bias=None, out_dtype=None, interpret=False, blocks=None):
    """Packed x packed W4A4 GEMM; same numerics as :func:`pallas_kernels.reference.w4a4_matmul_packed`."""
    p = check_packed_args(xq, w, bias, out_dtype, who="w4a4_matmul")
    if p.fmt != "nvfp4" and p.group < 32:
        raise NotImplementedError(f"INT group {p.group} < 32 (int8 MMA needs K >= 32)")
    blk = choose_blocks(p, w4a4=True, **(blocks or {}))
    mp = -(-p.m // blk.bm) * blk.bm
    xc = _pad_rows(xq.codes.reshape(p.m, -1), mp)
    xs = _pad_rows(_scales_u8(xq.scales).reshape(p.m, -1), mp)
    ws = _scales_u8(w.scales)
    args, specs = [], []
    if p.fmt == "nvfp4":
        args.append(_global_scales(xq, w))
        specs.append(pl.BlockSpec((2,), lambda i, j, s: (0,)))
        xs_spec = pl.BlockSpec((blk.bm, xs.shape[1]), lambda i, j, s: (i, 0))
        ws_spec = pl.BlockSpec((blk.bn, ws.shape[1]), lambda i, j, s: (j, 0))
    else:  # one contiguous row of float32 scales per group step (and 2^-8 of the 16 * code planes in x's)
        factor = 1.0 / 256.0 if p.fmt == "int4" else 1.0
        xs, ws = (xs.astype(_F32) * np.float32(factor)).T, ws.astype(_F32).T
        xs_spec = pl.BlockSpec((xs.shape[0], blk.bm), lambda i, j, s: (0, i))
        ws_spec = pl.BlockSpec((ws.shape[0], blk.bn), lambda i, j, s: (0, j))
    args += [xc, xs, w.codes, ws]
    specs += [pl.BlockSpec((blk.bm, xc.shape[1]), lambda i, j, s: (i, 0)), xs_spec,
              pl.BlockSpec((blk.bn, w.codes.shape[1]), lambda i, j, s: (j, 0)), ws_spec]
    if bias is not None and blk.split_k == 1:
        args.append(bias)
        specs.append(pl.BlockSpec((blk.bn,), lambda i, j, s: (j,)))
    kernel = functools.partial(_w4a4_kernel, p=p, blk=blk, has_bias=bias is not None and blk.split_k == 1,
                               asm=not interpret)
    tag = p.fmt + (f"g{p.group}" if p.fmt != "nvfp4" else "")
    out = _launch(kernel, args, specs, p, blk, f"w4a4_{tag}", interpret)
    scale = None
    if p.fmt == "nvfp4":
        g = jnp.asarray(xq.global_scale, _F32) * jnp.asarray(w.global_scale, _F32)
        scale = lambda acc: (acc * np.float32(2.0 ** 28)) * g  # noqa: E731
    return _finish(out, p, blk, bias, scale)


def w4a4_matmul(x, w, *, bias=None, act_global_scale=None, hadamard=False, out_dtype=None, interpret=False,
                blocks=None):
    """W4A4: ``x`` a QTensor from quantize_activation (packed x packed), or a float x quantized first.

    Float x: :func:`pallas_kernels.act_quant.quantize_activation` like ``w`` (nvfp4: ``act_global_scale``;
    ``hadamard`` rotates per group), then the packed GEMM; same numerics as
    :func:`pallas_kernels.reference.w4a4_matmul`.  ``blocks``: dict overriding :func:`choose_blocks`.
    """
    if not isinstance(x, QTensor):
        check_args(x, w, bias, out_dtype, who="w4a4_matmul", act_global_scale=act_global_scale, need_act_scale=True)
        out_dtype = jnp.dtype(x.dtype) if out_dtype is None else out_dtype
        x = act_quant.quantize_activation(
            x, w.fmt, global_scale=act_global_scale if w.fmt == "nvfp4" else None, hadamard=hadamard,
            group_size=w.group_size, scale_dtype=None if w.fmt == "nvfp4" else w.scales.dtype, interpret=interpret)
    elif act_global_scale is not None or hadamard:
        raise ValueError("w4a4_matmul: act_global_scale / hadamard belong to quantize_activation; a packed xq "
                         "already carries them")
    return w4a4_packed(x, w, bias=bias, out_dtype=out_dtype, interpret=interpret, blocks=blocks)


def w4a16_matmul(x, w, *, bias=None, out_dtype=None, interpret=False, blocks=None):
    """Weight-only kernel; same signature and numerics as :func:`pallas_kernels.reference.w4a16_matmul`."""
    p = check_args(x, w, bias, out_dtype, who="w4a16_matmul")
    cdt = jnp.dtype(x.dtype)
    blk = choose_blocks(p, w4a4=False, x_dtype=cdt, **(blocks or {}))
    mp = -(-p.m // blk.bm) * blk.bm
    x2 = _pad_rows(x.reshape(p.m, p.k), mp)
    args, specs = [], []
    if p.fmt == "nvfp4":
        args.append(_global_scales(None, w))
        specs.append(pl.BlockSpec((2,), lambda i, j, s: (0,)))
    if p.fmt == "nvfp4":
        ws = _scales_u8(w.scales)
        ws_spec = pl.BlockSpec((blk.bn, ws.shape[1]), lambda i, j, s: (j, 0))
    else:  # one contiguous row of float32 scales per group step
        ws = w.scales.astype(_F32).T
        ws_spec = pl.BlockSpec((ws.shape[0], blk.bn), lambda i, j, s: (0, j))
    args += [x2, w.codes, ws]
    specs += [pl.BlockSpec((blk.bm, p.k), lambda i, j, s: (i, 0)),
              pl.BlockSpec((blk.bn, w.codes.shape[1]), lambda i, j, s: (j, 0)), ws_spec]
    has_bias = bias is not None and blk.split_k == 1
    if has_bias:
        args.append(bias)
        specs.append(pl.BlockSpec((blk.bn,), lambda i, j, s: (j,)))
    kernel = functools.partial(_w4a16_kernel, p=p, blk=blk, has_bias=has_bias, asm=not interpret, cdt=cdt)
    tag = p.fmt + (f"g{p.group}" if p.fmt != "nvfp4" else "")
    out = _launch(kernel, args, specs, p, blk, f"w4a16_{tag}", interpret)
    scale = None
    if p.fmt == "nvfp4":
        gw = jnp.asarray(w.global_scale, _F32) * np.float32(2.0 ** 14)
        scale = lambda acc: acc * gw  # noqa: E731
    return _finish(out, p, blk, bias, scale)
