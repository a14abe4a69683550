"""Pallas kernels (Triton backend) for W4A4 and W4A16 linears on packed nvfp4 / int4 / int3 weights.

One program computes an output tile ``[bm, bn]``; a ``fori_loop`` walks K in steps of ``bk``
(fp32 accumulator).  Per K step:

* x tile ``[bm, bk]`` -> (optional per-group Hadamard rotation: one dot with
  ``blockdiag(H_g, ...)`` ``[bk, bk]`` (+-1 / 0, passed as an input), then ``* 1/sqrt(g)``) -> quantized in registers with the arithmetic of
  :mod:`pqjax.formats` spelled out in shifts, masks, compares and float ops
  (:mod:`pallas_kernels._numerics`; e4m3 scale rounding and e2m1 rounding by hand, so it works on
  sm_80 too; correctly rounded divisions via ``div.rn.f32``).
* packed weight tile decoded with shifts and masks: 4-bit codes ``[bn, bk/2]`` -> low / high nibble
  tiles -> values -> interleaved back to ``[bn, bk]`` with a 2-way ``tt.join`` + reshape (the same
  trick Pallas uses for int4 loads); int3: three stride-3 byte loads -> 24-bit words -> 8 code
  planes -> three levels of join.  e4m3 scales decoded from their uint8 bits by hand.
* MMA: ``lax.dot_general(bf16, bf16, preferred_element_type=f32)``.

Formulations (equal to :mod:`pallas_kernels.reference` up to fp32 accumulation order):

* nvfp4 (bk = 64: 4 blocks of 16 per step): operands are the exact values ``q*s`` in
  bf16; ``acc += x_val @ w_val.T``; epilogue ``acc * (gx*gw) + bias``.
* int (bk = the group size): ``acc += (qx @ qw.T) * (sx[:, None] * sw[None, :])`` with integer
  codes in bf16 (the per-group dot is exact); epilogue ``acc + bias``.
* W4A16: as above without the activation quantization; x in its own 16-bit dtype (f32 x: f32
  operands with HIGHEST precision, which Triton lowers to IEEE fp32 FMA).

M is padded to the row block (zero rows quantize to exact zeros) and sliced off again.  Shapes a
kernel cannot serve raise ``NotImplementedError`` (the dispatcher then uses the reference):
N not a multiple of 16, K not a multiple of 16 (nvfp4) or an INT group that is not a power of 2.
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

from . import _numerics as nm
from ._common import Problem, check_args, hadamard_block, hadamard_matrix

__all__ = ["Blocks", "choose_blocks", "w4a4_matmul", "w4a16_matmul"]

_F32 = jnp.float32
_BF16 = jnp.bfloat16
_NT = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]
_NN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N] -> [M, N]


@dataclasses.dataclass(frozen=True)
class Blocks:
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int


def _pow2_le(n: int, cap: int) -> int:
    b = 16
    while b * 2 <= cap and b * 2 <= n:
        b *= 2
    return b


def _largest_dividing(n: int, cands=(128, 64, 32, 16)) -> int | None:
    return next((c for c in cands if n % c == 0), None)


def choose_blocks(p: Problem, *, w4a4: bool, hadamard: bool = False, block_m=None, block_n=None,
                  block_k=None, num_warps=None, num_stages=None) -> Blocks:
    """Block sizes for one problem: a small static table (overrides win).

    Chosen from ptxas register/spill reports for sm_80 and sm_90 at FLUX shapes (no GPU timing
    yet; ``python -m pallas_kernels.bench --autotune`` on a GPU refines it): 128x128 tiles with 8
    warps and bk=64 (nvfp4) / one group (INT) compile without spills; the Hadamard variants need
    64-row tiles with 4 warps.  Raises NotImplementedError for shapes the kernels do not serve.
    """
    if p.n % 16:
        raise NotImplementedError(f"N={p.n} is not a multiple of 16 (Triton block dims are powers of 2 >= 16)")
    if p.fmt == "nvfp4":
        if p.k % 16:
            raise NotImplementedError(f"K={p.k} is not a multiple of 16")
        bk = block_k or _largest_dividing(p.k, (64, 32, 16))
        if bk % 16 or p.k % bk or bk & (bk - 1):
            raise NotImplementedError(f"block_k={bk} must be a power of 2, a multiple of 16 and divide K={p.k}")
    else:
        if p.group & (p.group - 1) or p.group < 16:
            raise NotImplementedError(f"INT group size {p.group} is not a power of 2 >= 16")
        if block_k not in (None, p.group):
            raise NotImplementedError(f"INT kernels step K by one group ({p.group}), got block_k={block_k}")
        bk = p.group
    bm = block_m or _pow2_le(p.m, 64 if (w4a4 and hadamard) else 128)
    bn = block_n or _largest_dividing(p.n, (128, 64, 32, 16) if p.m > 16 else (64, 32, 16))
    if bm < 16 or bm & (bm - 1):
        raise NotImplementedError(f"block_m={bm} must be a power of 2 >= 16")
    if bn < 16 or bn & (bn - 1) or p.n % bn:
        raise NotImplementedError(f"block_n={bn} must be a power of 2 >= 16 dividing N={p.n}")
    if num_warps is None:
        num_warps = 8 if bm * bn >= 128 * 128 else 4
    if num_stages is None:
        num_stages = 3
    return Blocks(bm, bn, bk, num_warps, num_stages)


# --------------------------------------------------------------------------------------------
# in-kernel building blocks
# --------------------------------------------------------------------------------------------
def _bcast_groups(s, width):
    """``s [R, G]`` -> ``[R, G * width]`` with each entry repeated ``width`` times."""
    r, g = s.shape
    return jnp.broadcast_to(s[:, :, None], (r, g, width)).reshape(r, g * width)


def _rotate(x, h_ref, block, cdt):
    """Per-``block`` Hadamard rotation of an x tile ``[bm, bk]`` (original dtype) -> float32.

    ``h_ref`` holds ``blockdiag(H_block, ..., H_block)`` of size ``[bk, bk]`` (+-1 and 0): one
    MMA-shaped dot, no reshapes.  The zeros add exact zeros, so the value is the per-block dot.
    """
    h = h_ref[...]
    if cdt == _F32:
        y = lax.dot_general(x.astype(_F32), h, _NN, precision=lax.Precision.HIGHEST,
                            preferred_element_type=_F32)
    else:  # 16-bit x times +-1 entries: exact products, fp32 accumulation
        y = lax.dot_general(x.astype(cdt), h, _NN, preferred_element_type=_F32)
    return y * (1.0 / float(block) ** 0.5)


def _nonfinite(xg):
    """``xg [..., G, g]`` -> ``[..., G]`` True where the group holds a NaN or +-Inf.

    (Triton's max is NaN-ignoring, so non-finite groups are detected with ``sum(x - x)``.)
    """
    return jnp.sum(xg - xg, axis=-1) != 0.0


def _quant_nvfp4_tile(x, gx, dm):
    """float32 x tile ``[bm, bk]`` -> exact bf16 values ``q * s`` (no global), nvfp4 arithmetic."""
    bm, bk = x.shape
    xg = x.reshape(bm, bk // 16, 16)
    xs = nm.div(x, gx, dm)
    amax = jnp.max(jnp.abs(xs).reshape(bm, bk // 16, 16), axis=-1)
    s = nm.round_e4m3(jnp.minimum(nm.div(amax, 6.0, dm), 448.0))
    s = jnp.where(_nonfinite(xg), jnp.nan, s)
    sb = _bcast_groups(s, 16)
    y = jnp.where(sb > 0, nm.div(xs, jnp.where(sb > 0, sb, 1.0), dm), 0.0)
    q = nm.round_e2m1(nm.clip(y, -6.0, 6.0))
    return (q * sb).astype(_BF16)


def _quant_int_tile(x, qmax, sdt, dm):
    """float32 x tile ``[bm, g]`` (one group) -> (bf16 integer codes, f32 scales [bm])."""
    amax = jnp.max(jnp.abs(x), axis=-1)
    s = jnp.minimum(nm.div(amax, float(qmax), dm), float(jnp.finfo(sdt).max))
    s = s.astype(sdt).astype(_F32)
    sb = s[:, None]
    y = jnp.where(sb > 0, nm.div(x, jnp.where(sb > 0, sb, 1.0), dm), 0.0)
    q = nm.round_half_even(nm.clip(y, -float(qmax), float(qmax)))
    s = jnp.where(jnp.sum(x - x, axis=-1) != 0.0, jnp.nan, s)
    return q.astype(_BF16), s


def _load_nvfp4_w(wc_ref, ws_ref, k, bk, cdt):
    """Packed nvfp4 weight tile of K-step ``k`` -> exact values ``q * s`` ``[bn, bk]`` in ``cdt``."""
    c = wc_ref[:, pl.ds(pl.multiple_of(k * (bk // 2), bk // 2), bk // 2)].astype(jnp.int32)
    sw = nm.e4m3_value(ws_ref[:, pl.ds(k * (bk // 16), bk // 16)].astype(jnp.int32))  # [bn, bk/16]
    swb = _bcast_groups(sw, 8)  # one scale per 8 bytes = 16 codes
    lo = (nm.e2m1_value(c & 15) * swb).astype(cdt)
    hi = (nm.e2m1_value(c >> 4) * swb).astype(cdt)
    return nm.interleave2(lo, hi)


def _load_int_w(wc_ref, k, g, fmt, cdt):
    """Packed INT codes of group ``k`` -> sign-extended integer codes ``[bn, g]`` in ``cdt``."""
    if fmt == "int4":
        c = wc_ref[:, pl.ds(pl.multiple_of(k * (g // 2), g // 2), g // 2)].astype(jnp.int32)
        lo = (((c & 15) ^ 8) - 8).astype(cdt)
        hi = (((c >> 4) ^ 8) - 8).astype(cdt)
        return nm.interleave2(lo, hi)
    nw = g // 8  # 24-bit words per group
    base = k * (3 * nw)
    b = [wc_ref[:, pl.ds(base + i, nw, stride=3)].astype(jnp.int32) for i in range(3)]
    word = b[0] | (b[1] << 8) | (b[2] << 16)
    planes = [((((word >> (3 * j)) & 7) ^ 4) - 4).astype(cdt) for j in range(8)]
    return nm.interleave8(planes)


def _dot_nt(a, b, cdt):
    if cdt == _F32:
        return lax.dot_general(a, b, _NT, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)
    return lax.dot_general(a, b, _NT, preferred_element_type=_F32)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
def _kernel(*refs, p: Problem, blk: Blocks, w4a4: bool, hadamard: bool, has_bias: bool, dm: str,
            cdt, sdt):
    refs = list(refs)
    o_ref = refs.pop()
    gs_ref = refs.pop(0) if p.fmt == "nvfp4" else None
    h_ref = refs.pop(0) if hadamard else None
    x_ref, wc_ref, ws_ref = refs[:3]
    b_ref = refs[3] if has_bias else None
    bm, bn, bk = blk.bm, blk.bn, blk.bk
    nk = p.k // bk
    rblock = hadamard_block(p.fmt, p.group)

    def x_tile(k):
        x = x_ref[:, pl.ds(pl.multiple_of(k * bk, bk), bk)]
        if hadamard:
            return _rotate(x, h_ref, rblock, cdt)
        return x.astype(_F32)

    if p.fmt == "nvfp4":
        gx = gs_ref[0] if w4a4 else None

        def body(k, acc):
            w = _load_nvfp4_w(wc_ref, ws_ref, k, bk, _BF16 if w4a4 else cdt)
            if w4a4:
                xv = _quant_nvfp4_tile(x_tile(k), gx, dm)
            else:
                xv = x_ref[:, pl.ds(pl.multiple_of(k * bk, bk), bk)].astype(cdt)
            return acc + _dot_nt(xv, w, _BF16 if w4a4 else cdt)
    else:
        def body(k, acc):
            w = _load_int_w(wc_ref, k, bk, p.fmt, _BF16 if w4a4 else cdt)
            sw = ws_ref[:, k].astype(_F32)  # [bn]
            if w4a4:
                qx, sx = _quant_int_tile(x_tile(k), p.qmax, sdt, dm)
                return acc + _dot_nt(qx, w, _BF16) * (sx[:, None] * sw[None, :])
            xv = x_ref[:, pl.ds(pl.multiple_of(k * bk, bk), bk)].astype(cdt)
            return acc + _dot_nt(xv, w, cdt) * sw[None, :]

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), _F32))
    if p.fmt == "nvfp4":
        acc = acc * (gx * gs_ref[1]) if w4a4 else acc * gs_ref[1]
    if has_bias:
        acc = acc + b_ref[...].astype(_F32)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _call(x, w, *, bias, act_global_scale, hadamard, out_dtype, w4a4, interpret, div_mode, blocks):
    who = "w4a4_matmul" if w4a4 else "w4a16_matmul"
    p = check_args(x, w, bias, out_dtype, who=who, act_global_scale=act_global_scale, need_act_scale=w4a4)
    blk = choose_blocks(p, w4a4=w4a4, hadamard=hadamard, **(blocks or {}))
    cdt = jnp.dtype(x.dtype)
    sdt = jnp.dtype(w.scales.dtype)
    if div_mode not in ("ieee", "native"):
        raise ValueError(f"div_mode must be 'ieee' or 'native', got {div_mode!r}")
    dm = "native" if div_mode == "native" else ("ieee" if interpret else "rn")
    bm, bn = blk.bm, blk.bn
    mp = -(-p.m // bm) * bm
    x2 = x.reshape(p.m, p.k)
    if mp != p.m:
        x2 = jnp.pad(x2, ((0, mp - p.m), (0, 0)))

    args, specs = [], []
    if p.fmt == "nvfp4":
        gw = jnp.asarray(w.global_scale, _F32)
        gx = jnp.asarray(act_global_scale, _F32) if w4a4 else jnp.ones((), _F32)
        args.append(jnp.stack([gx, gw]))
        specs.append(pl.BlockSpec((2,), lambda i, j: (0,)))
    if hadamard:
        rb = hadamard_block(p.fmt, p.group)
        hb = np.kron(np.eye(blk.bk // rb, dtype=np.float32), hadamard_matrix(rb))  # [bk, bk]
        args.append(jnp.asarray(hb, _F32 if cdt == _F32 else cdt))
        specs.append(pl.BlockSpec((blk.bk, blk.bk), lambda i, j: (0, 0)))
    scales = w.scales
    if p.fmt == "nvfp4":
        scales = lax.bitcast_convert_type(scales, jnp.uint8)
    kc = w.codes.shape[1]
    args += [x2, w.codes, scales]
    specs += [
        pl.BlockSpec((bm, p.k), lambda i, j: (i, 0)),
        pl.BlockSpec((bn, kc), lambda i, j: (j, 0)),
        pl.BlockSpec((bn, p.k // p.group), lambda i, j: (j, 0)),
    ]
    if bias is not None:
        args.append(bias)
        specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))

    kernel = functools.partial(_kernel, p=p, blk=blk, w4a4=w4a4, hadamard=hadamard,
                               has_bias=bias is not None, dm=dm, cdt=cdt, sdt=sdt)
    fmt_tag = p.fmt + (f"g{p.group}" if p.fmt != "nvfp4" else "")
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, p.n), p.out_dtype),
        grid=(mp // bm, p.n // bn),
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=interpret,
        name=f"{'w4a4' if w4a4 else 'w4a16'}_{fmt_tag}{'_had' if hadamard else ''}",
    )(*args)
    if mp != p.m:
        out = out[: p.m]
    return out.reshape(*p.lead, p.n)


def w4a4_matmul(x, w, *, bias=None, act_global_scale=None, hadamard=False, out_dtype=None,
                interpret=False, div_mode="ieee", blocks=None):
    """W4A4 Pallas kernel; same signature and numerics as :func:`pallas_kernels.reference.w4a4_matmul`.

    ``interpret``: run through the Pallas interpreter (CPU tests).  ``div_mode``: "ieee" (default:
    correctly rounded divisions, ``div.rn.f32`` inline PTX on CUDA) or "native" (plain ``/``:
    Triton's approximate ``div.full.f32``; for experiments against XLA-GPU references).  ``blocks``: dict overriding
    :func:`choose_blocks` (block_m, block_n, block_k, num_warps, num_stages).
    """
    return _call(x, w, bias=bias, act_global_scale=act_global_scale, hadamard=hadamard,
                 out_dtype=out_dtype, w4a4=True, interpret=interpret, div_mode=div_mode, blocks=blocks)


def w4a16_matmul(x, w, *, bias=None, out_dtype=None, interpret=False, div_mode="ieee", blocks=None):
    """Weight-only Pallas kernel; same signature and numerics as :func:`pallas_kernels.reference.w4a16_matmul`."""
    return _call(x, w, bias=bias, act_global_scale=None, hadamard=False, out_dtype=out_dtype,
                 w4a4=False, interpret=interpret, div_mode=div_mode, blocks=blocks)
