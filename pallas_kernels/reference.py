"""Pure-XLA references for the quantized linears: the numerics of record the kernels reproduce.

``w`` is a Flax kernel ``W[K, N]`` quantized with :func:`pqjax.formats.quantize` along ``axis=0``
(stored ``codes [N, K/2]`` or ``[N, 3K/8]``, ``scales [N, K/group]``).  ``x[..., K]`` is
bfloat16, float16 or float32; leading dims are flattened to ``M``.  Output ``[..., N]`` in
``out_dtype`` (default ``x.dtype``); ``bias`` is added in float32 before the cast.

W4A4 (:func:`w4a4_matmul`): the activation is quantized with the weight's format by
:mod:`pqjax.formats` itself (so it is bit-identical to ``fake_quant``):

* nvfp4: per 16-block with the STATIC fp32 ``act_global_scale`` (from calibration):
  ``nvfp4_block_quant(x, gx)``.
* int4 / int3: per token per group (dynamic), the weight's group size and scale dtype:
  ``int_group_quant(x, bits, group, w.scales.dtype)``.
* ``hadamard=True`` (PermuQuant-H): before quantizing, x is rotated per group (block 16 for
  nvfp4) by the normalized Sylvester Hadamard matrix, computed as ``(x_g @ H_pm1) * (1/sqrt(g))``
  in float32 (``H_pm1`` has entries +-1, so the products are exact; HIGHEST precision).  The
  weight is NOT rotated here: whoever built ``w`` rotated it offline with the same symmetric
  orthogonal matrix, ``W_rot[group rows] = (H_pm1 / sqrt(g)) @ W[group rows]``.

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

Rounding ties (read this before comparing bits): the formulas divide (``x / global``,
``amax / 6``, ``x' / s``, ``x / s``) and exact RNE ties are common (bf16 inputs carry 8
significant bits, e4m3 scales 4).  The kernels evaluate every division correctly rounded (IEEE;
``div.rn.f32`` on CUDA), i.e. the formulas of :mod:`pqjax.formats.nvfp4` in IEEE float32.  XLA does not: its algebraic
simplifier rewrites ``a / broadcast(b)`` into ``a * broadcast(1/b)`` and ``(a/b)/c`` into
``a/(b*c)`` (seen on CPU), and XLA:GPU emits the approximate ``div.full.f32`` for f32 division.
So this reference (= ``pqjax.formats`` under XLA) breaks roughly 1 in 2000 nvfp4 activation
codes of bf16 data the other way; the tests allow exactly that (a few codes one step off per
output) between kernel and reference, and hold the kernel to the IEEE model with no slack.

W4A16 (:func:`w4a16_matmul`): weight-only.  nvfp4: ``x @ (q*s)`` with ``q*s`` exact in the
compute dtype (x's 16-bit dtype, or float32 with HIGHEST precision for float32 x), fp32
accumulation, then ``* gw``.  INT: ``x @ (q*s)`` in float32 (HIGHEST): ``q*s`` is exact in f32
and, for 16-bit x, so is every product ``x*q*s`` (8 + 11 bits), again equal to the kernels'
per-group ``sum_g (x_g . qw_g) * sw[n,g]`` up to fp32 accumulation order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pqjax.formats import (
    block_hadamard,
    e2m1_decode,
    int_group_quant,
    nvfp4_block_quant,
    unpack_3bit,
    unpack_4bit,
)

from ._common import check_args, hadamard_block

__all__ = ["w4a4_matmul", "w4a16_matmul", "hadamard_rotate", "dequantize_weight_parts"]

_HI = lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))  # contract the last dim of [M, K] with the last dim of [N, K]


def hadamard_rotate(x, block: int):
    """``x[..., K]`` -> float32 ``x`` rotated per ``block`` by ``H_pm1 / sqrt(block)`` (see module doc)."""
    return block_hadamard(x.astype(jnp.float32), block)


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


def w4a4_matmul(x, w, *, bias=None, act_global_scale=None, hadamard=False, out_dtype=None):
    """W4A4 reference: quantize ``x`` like ``w`` (see module doc), exact operand values, fp32 dot."""
    p = check_args(x, w, bias, out_dtype, who="w4a4_matmul", act_global_scale=act_global_scale,
                   need_act_scale=True)
    x2 = x.reshape(p.m, p.k)
    if hadamard:
        x2 = hadamard_rotate(x2, hadamard_block(p.fmt, p.group))
    w_val, gw = dequantize_weight_parts(w)
    if p.fmt == "nvfp4":
        gx = jnp.asarray(act_global_scale, jnp.float32)
        codes, sx = nvfp4_block_quant(x2, gx)
        x_val = (e2m1_decode(codes).reshape(p.m, p.k // 16, 16) * sx.astype(jnp.float32)[..., None])
        x_val = x_val.reshape(p.m, p.k).astype(jnp.bfloat16)  # exact
        acc = lax.dot_general(x_val, w_val.astype(jnp.bfloat16), _NT, preferred_element_type=jnp.float32)
        acc = acc * (gx * gw)
    else:
        bits = 4 if p.fmt == "int4" else 3
        qx, sx = int_group_quant(x2, bits, p.group, w.scales.dtype)
        x_val = (qx.astype(jnp.float32).reshape(p.m, p.k // p.group, p.group)
                 * sx.astype(jnp.float32)[..., None]).reshape(p.m, p.k)
        acc = lax.dot_general(x_val, w_val, _NT, precision=_HI, preferred_element_type=jnp.float32)
    return _epilogue(acc, bias, p)


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
