"""Pure-XLA references for the quantized linears: the numerics of record the kernels reproduce.

``w`` is a Flax kernel ``W[K, N]`` quantized with :func:`pqjax.formats.quantize` along ``axis=0``
(stored ``codes [N, K/2]`` or ``[N, 3K/8]``, ``scales [N, K/group]``).  ``x[..., K]`` is
bfloat16, float16 or float32; leading dims are flattened to ``M``.  Output ``[..., N]`` in
``out_dtype`` (default ``x.dtype``); ``bias`` is added in float32 before the cast.

Activation (:func:`quantize_activation`): ONE quantization per site, shared by every linear reading it:
``x[..., perm]`` (the site's channel order), ``(x * smooth).astype(x.dtype)``, the per-group Hadamard
rotation, then :mod:`pqjax.formats` itself (bit-identical to ``fake_quant`` of the transformed x):

* nvfp4: per 16-block with the STATIC fp32 global scale (from calibration): ``nvfp4_block_quant(x, gx)``.
* int4 / int3: per token per group (dynamic), the weight's group size and scale dtype:
  ``int_group_quant(x, bits, group, scale_dtype)``.
* ``hadamard=True`` (PermuQuant-H): x is rotated per group (block 16 for nvfp4) by the normalized
  Sylvester Hadamard matrix ``H_pm1 / sqrt(g)``, evaluated as the butterfly :func:`_numerics.fwht`
  (log2(g) float32 add/sub levels) and one multiply by ``f32(1/sqrt(g))``: a fixed float32 operation
  order, so the kernel reproduces it bit for bit.  The weight is NOT rotated here: whoever built ``w``
  rotated it offline with the same symmetric orthogonal matrix, ``W_rot[group rows] = (H_pm1 / sqrt(g))
  @ W[group rows]``.

W4A4 (:func:`w4a4_matmul_packed`): two QTensors, the packed activation and the weight.
:func:`w4a4_matmul` on a float x is :func:`quantize_activation` like ``w`` followed by it.

Products:

* nvfp4: each operand is dequantized to its exact value ``q * s`` WITHOUT the global scale (an
  e2m1 value has 2 significant bits and an e4m3 scale 4, so ``q * s`` is exact in bfloat16);
  ``bf16 x bf16 -> fp32`` dot_general; then ``* (gx * gw)`` in fp32.
* int4 / int3: ``q * s`` is exact in float32 (|q| <= 7 has 3 bits, a bfloat16 scale 8 bits), and
  so is the product of two such values (22 <= 24 bits).  The reference therefore takes ONE
  float32 dot (precision HIGHEST) of the dequantized operands: every term ``qx*sx*qw*sw`` is
  exact and only the fp32 accumulation order can differ from the per-group formulation
  ``sum_g (qx_g . qw_g) * (sx[m,g] * sw[n,g])`` the kernels use (whose per-group integer dot is
  exact).  Both are therefore equal up to fp32 accumulation order.  (float16 / float32 scales:
  each term is rounded once more, still at fp32-rounding level.)

Rounding ties (read this before comparing bits): the formulas divide and exact RNE ties are common
(bf16 inputs carry 8 significant bits, e4m3 scales 4).  :mod:`pqjax.formats` writes every division as a
multiplication by the IEEE float32 reciprocal (``div_by_scale``; what XLA compiles ``x / s`` into
anyway), and the activation kernel does exactly that (``div.rn.f32`` for the reciprocal on CUDA), so
kernel and reference codes are bit-identical.  Against true divisions (DESIGN.md's formulas in IEEE
float32) roughly 1 in 2000 nvfp4 activation codes of bf16 data break a tie the other way; the tests
allow exactly that against an IEEE model, and nothing between kernel and reference.  (XLA:GPU lowers
the reference's f32 divisions to the approximate ``div.full.f32``: on a GPU the XLA reference can
differ from both in rare codes.)

W4A16 (:func:`w4a16_matmul`): weight-only.  nvfp4: ``x @ (q*s)`` with ``q*s`` exact in the
compute dtype (x's 16-bit dtype, or float32 with HIGHEST precision for float32 x), fp32
accumulation, then ``* gw``.  INT: ``x @ (q*s)`` in float32 (HIGHEST): ``q*s`` is exact in f32
and, for 16-bit x, so is every product ``x*q*s`` (8 + 11 bits), again equal to the kernels'
per-group ``sum_g (x_g . qw_g) * sw[n,g]`` up to fp32 accumulation order.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pqjax.formats import (
    QTensor,
    e2m1_decode,
    int_group_quant,
    nvfp4_block_quant,
    pack_3bit,
    pack_4bit,
    unpack_3bit,
    unpack_4bit,
)

from . import _numerics as nm
from ._common import check_args, check_packed_args, check_quantize_args, hadamard_block

__all__ = ["quantize_activation", "w4a4_matmul", "w4a4_matmul_packed", "w4a16_matmul", "hadamard_rotate",
           "dequantize_weight_parts", "dequantize_act_parts"]

_HI = lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))  # contract the last dim of [M, K] with the last dim of [N, K]


def hadamard_rotate(x, block: int):
    """``x[..., K]`` -> float32 ``x`` rotated per ``block`` by ``H_pm1 / sqrt(block)`` (see module doc).

    Evaluated as the butterfly :func:`pallas_kernels._numerics.fwht` over the ``block`` positions of each
    group, then one multiply by ``f32(1 / sqrt(block))``: the same float32 operations, in the same
    order, as the activation-quantize kernel, so both give the same bits.
    """
    k = x.shape[-1]
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], k // block, block)
    planes = nm.fwht([xg[..., j] for j in range(block)])
    y = jnp.stack(planes, axis=-1) * jnp.float32(1.0 / float(block) ** 0.5)
    return y.reshape(x.shape)


def _weight_codes(w):
    if w.fmt == "nvfp4":
        return unpack_4bit(w.codes)  # uint8 e2m1 patterns [N, K]
    if w.fmt == "int4":
        return unpack_4bit(w.codes, signed=True)  # int8 [N, K]
    return unpack_3bit(w.codes, signed=True)


def dequantize_weight_parts(w):
    """``(w_val [N, K] float32 = q * s exactly, global fp32 or None)`` of a [K, N] axis=0 QTensor."""
    n, k = w.shape[1], w.shape[0]
    c = _weight_codes(w)
    q = e2m1_decode(c) if w.fmt == "nvfp4" else c.astype(jnp.float32)
    g = w.group_size
    s = w.scales.astype(jnp.float32)
    val = (q.reshape(n, k // g, g) * s[..., None]).reshape(n, k)
    gs = None if w.global_scale is None else jnp.asarray(w.global_scale, jnp.float32)
    return val, gs


def _epilogue(acc, bias, p):
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(p.out_dtype).reshape(*p.lead, p.n)


def quantize_activation(x, fmt, *, global_scale=None, perm=None, hadamard=False, smooth=None, group_size=None,
                        scale_dtype=None):
    """Reference activation quantization: ``pqjax.formats`` applied to the gathered / smoothed / rotated x.

    ``x[..., K]`` -> ``QTensor`` of x's logical shape quantized along the last axis (codes ``[..., K/2]``
    (``[..., 3K/8]`` for int3), scales ``[..., K/group]``).  In order: ``x[..., perm]`` (the site's channel
    order), ``(x * smooth).astype(x.dtype)`` (SmoothQuant, in the permuted order), the per-group Hadamard
    rotation (:func:`hadamard_rotate`, float32), then ``nvfp4_block_quant(x, global_scale)`` or
    ``int_group_quant(x, bits, group, scale_dtype)``.  A traced nvfp4 ``global_scale`` that is not finite
    and > 0 makes every block scale NaN (codes 0x8), like a non-finite block.
    """
    p = check_quantize_args(x, fmt, global_scale=global_scale, perm=perm, hadamard=hadamard, smooth=smooth,
                            group_size=group_size, scale_dtype=scale_dtype)
    x2 = x.reshape(p.m, p.k)
    if perm is not None:
        x2 = jnp.take(x2, jnp.asarray(perm, jnp.int32), axis=1)
    if smooth is not None:
        x2 = (x2.astype(jnp.float32) * jnp.asarray(smooth, jnp.float32)).astype(x.dtype)
    if hadamard:
        x2 = hadamard_rotate(x2, hadamard_block(fmt, p.group))
    if fmt == "nvfp4":
        gx = jnp.asarray(global_scale, jnp.float32)
        codes, scales = nvfp4_block_quant(x2, gx)
        ok = jnp.isfinite(gx) & (gx > 0)
        scales = jnp.where(ok, scales, jnp.array(jnp.nan, scales.dtype))
        codes = jnp.where(ok, codes, jnp.uint8(8))
        packed, gs = pack_4bit(codes), gx
    else:
        codes, scales = int_group_quant(x2, 4 if fmt == "int4" else 3, p.group, p.scale_dtype)
        packed, gs = (pack_4bit(codes) if fmt == "int4" else pack_3bit(codes)), None
    return QTensor(packed.reshape(*p.lead, packed.shape[-1]), scales.reshape(*p.lead, scales.shape[-1]), gs,
                   fmt=fmt, group_size=p.group, shape=tuple(x.shape), axis=x.ndim - 1, dtype=p.x_dtype.name)


def dequantize_act_parts(xq):
    """``(x_val [M, K] float32 = q * s exactly, global fp32 or None)`` of an activation QTensor."""
    k = xq.shape[-1]
    codes = xq.codes.reshape(-1, xq.codes.shape[-1])
    m = codes.shape[0]
    if xq.fmt == "nvfp4":
        q = e2m1_decode(unpack_4bit(codes))
    elif xq.fmt == "int4":
        q = unpack_4bit(codes, signed=True).astype(jnp.float32)
    else:
        q = unpack_3bit(codes, signed=True).astype(jnp.float32)
    g = xq.group_size
    s = xq.scales.reshape(m, k // g).astype(jnp.float32)
    val = (q.reshape(m, k // g, g) * s[..., None]).reshape(m, k)
    gs = None if xq.global_scale is None else jnp.asarray(xq.global_scale, jnp.float32)
    return val, gs


def w4a4_matmul_packed(xq, w, *, bias=None, out_dtype=None):
    """Reference packed x packed GEMM: exact operand values ``q * s`` of both QTensors, fp32 dot (module doc)."""
    p = check_packed_args(xq, w, bias, out_dtype, who="w4a4_matmul")
    x_val, gx = dequantize_act_parts(xq)
    w_val, gw = dequantize_weight_parts(w)
    if p.fmt == "nvfp4":
        acc = lax.dot_general(x_val.astype(jnp.bfloat16), w_val.astype(jnp.bfloat16), _NT,
                              preferred_element_type=jnp.float32)  # exact operands
        acc = acc * (gx * gw)
    else:
        acc = lax.dot_general(x_val, w_val, _NT, precision=_HI, preferred_element_type=jnp.float32)
    return _epilogue(acc, bias, p)


def w4a4_matmul(x, w, *, bias=None, act_global_scale=None, hadamard=False, out_dtype=None):
    """W4A4 reference on a float ``x``: :func:`quantize_activation` like ``w``, then :func:`w4a4_matmul_packed`."""
    check_args(x, w, bias, out_dtype, who="w4a4_matmul", act_global_scale=act_global_scale, need_act_scale=True)
    xq = quantize_activation(x, w.fmt, global_scale=act_global_scale if w.fmt == "nvfp4" else None,
                             hadamard=hadamard, group_size=w.group_size,
                             scale_dtype=None if w.fmt == "nvfp4" else w.scales.dtype)
    return w4a4_matmul_packed(xq, w, bias=bias, out_dtype=jnp.dtype(x.dtype) if out_dtype is None else out_dtype)


def w4a16_matmul(x, w, *, bias=None, out_dtype=None):
    """Weight-only reference: dequantized packed weight x 16-bit (or f32) activation, fp32 accumulation."""
    p = check_args(x, w, bias, out_dtype, who="w4a16_matmul")
    x2 = x.reshape(p.m, p.k)
    w_val, gw = dequantize_weight_parts(w)
    if p.fmt == "nvfp4" and x2.dtype != jnp.float32:
        acc = lax.dot_general(x2, w_val.astype(x2.dtype), _NT, preferred_element_type=jnp.float32)
    else:
        acc = lax.dot_general(x2.astype(jnp.float32), w_val, _NT, precision=_HI,
                              preferred_element_type=jnp.float32)
    if gw is not None:
        acc = acc * gw
    return _epilogue(acc, bias, p)
