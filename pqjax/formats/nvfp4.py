"""NVFP4: e2m1 values in blocks of 16 with an e4m3 scale per block and one fp32 global scale.

The arithmetic is JAX's own quantizer (``jax._src.cudnn.scaled_matmul_stablehlo.quantize``, mode
"nvfp4"), ``x' = x / global; s = e4m3(clip(blockamax(x') / 6, 0, 448)); q = e2m1(clip(x' / s))``,
written out the way XLA actually executes it.  XLA's algebraic simplifier turns ``A / const`` and
``A / broadcast(B)`` into ``A * (1 / B)``, so every division by a scale is a multiplication by the
IEEE f32 reciprocal.  We write those reciprocals explicitly, so the result no longer depends on
what a compiler does (jit, vmap, fusion) and a GPU kernel can copy it (``r = 1 / s`` must be an
IEEE round-to-nearest division, e.g. ``div_rn`` in Triton), all in float32::

    global = amax(|x|) * f32(1 / 2688)                  2688 = 6 * 448; unless given
    x'     = x * (1 / global)                           blocks of 16 along the last axis (*)
    s      = e4m3(clip(blockamax(|x'|) * f32(1 / 6), 0, 448))   RNE; clip first (no e4m3 saturation)
    q      = e2m1(clip(x' * (1 / f32(s)), -6, 6))       RNE
    x      ~ (q * s) * global

(*) every ``a * (1 / b)`` is :func:`div_by_scale`, which also keeps huge ``b`` (>= 2^64) exact.

Codes and scales are bit-identical to JAX's for finite input, with these documented exceptions:

* Blocks whose e4m3 scale is 0 (all-zero blocks, or blocks so small relative to ``global`` that
  their scale underflows e4m3) get codes 0 and dequantize to exact +0.  (JAX divides by the zero
  scale there and produces NaN -> -0 codes or +-6 codes; either way the information is nil.)
* An all-zero tensor gets ``global = 1`` instead of 0 (JAX would divide by zero).
* Non-finite input: any block holding a NaN or +-Inf gets a NaN scale (e4m3fn 0x7F) and codes 0x8
  (-0, what XLA's f32->e2m1 convert gives NaN), so the whole block dequantizes to NaN, never to
  a finite number.  The automatic global scale is the amax over the *finite* entries only, so one
  bad value does not poison the other blocks.  (JAX clips Inf blocks to 448 * 6 instead.)
* Huge finite values never become NaN: the block scale is clipped to 448 before the e4m3 cast and
  ``x' / s`` to +-6 before the e2m1 encode.

Everything here is plain jnp with integer bit arithmetic for the e2m1 encode/decode (no float4
dtypes, no bitcasts to sub-byte types), so a Pallas/Triton kernel can copy it.

Four Over Six (``four_over_six=True``; Cook et al., "Four Over Six: More Accurate NVFP4 Quantization with
Adaptive Block Scaling", arXiv 2512.02010, reference code github.com/mit-han-lab/fouroversix): every block
gets two candidate scales, the usual one mapping the block amax to 6 and one mapping it to 4
(``s4 = e4m3(clip(blockamax(|x'|) * 0.25, 0, 448))``; |values| near the amax then land on the finer
steps 3, 4 instead of 4, 6), both are encoded, and the block keeps the candidate whose squared error
``sum_block (e2m1(q) * s - x')^2`` (dequantized block vs the input, in the global-scaled domain x') is
LOWER; a tie keeps 6.  The output is ordinary NVFP4 (codes + e4m3 scales + global).  Following the
paper, the automatic global scale becomes ``amax / (6 * 256)`` instead of ``amax / (6 * 448)``: the
largest 6-candidate scale is then 256 and the largest 4-candidate 384, so neither saturates e4m3
(448).  A given ``global_scale`` is used as is (scales are still clipped to 448 before the cast).
The selection is elementwise arithmetic plus one select per block, in a FIXED order a kernel can
reproduce bit for bit: ``d = e2m1(q) * s - x'`` (exact product, one f32 subtraction), ``e = d * d``
(one f32 multiplication, never fused into an FMA), then adjacent pairwise sums
``e[2i] + e[2i+1]`` in four levels (16 -> 8 -> 4 -> 2 -> 1), then ``use4 = err4 < err6``.

e2m1 code layout (4 bits): bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa::

    code & 7 : 0    1    2    3    4    5    6    7
    |value|  : 0   0.5   1   1.5   2    3    4    6
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "E2M1_MAX", "E4M3_MAX", "NVFP4_BLOCK", "NVFP4_RANGE", "e2m1_encode", "e2m1_decode",
    "div_by_scale", "nvfp4_global_scale", "nvfp4_block_quant", "nvfp4_block_dequant", "nvfp4_encode",
    "E4M3_MAX_FOUR_OVER_SIX",
]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
NVFP4_RANGE = E2M1_MAX * E4M3_MAX   # 2688: the global scale maps amax to it (global = amax / NVFP4_RANGE)
_INV_6 = np.float32(1) / np.float32(E2M1_MAX)                 # = f32(1/6), what XLA folds "/ 6" into
_INV_2688 = np.float32(1) / np.float32(NVFP4_RANGE)           # = f32(1/2688)
E4M3_MAX_FOUR_OVER_SIX = 256.0                                 # 4/6's largest 6-candidate scale (paper)
_INV_1536 = np.float32(1) / np.float32(E2M1_MAX * E4M3_MAX_FOUR_OVER_SIX)  # = f32(1/1536)
_INV_4 = np.float32(0.25)                                      # maps the block amax to 4 (exact)

# RNE decision points on |x| for e2m1: (threshold, tie goes up?).  A tie rounds to the even code.
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
               (2.5, False), (3.5, True), (5.0, False))


@jax.jit
def div_by_scale(x, s):
    """``x / s`` the way XLA compiles it, made explicit: ``x * f32(1 / s)`` (IEEE reciprocal).

    For ``|s| >= 2^64`` both operands are first multiplied by ``2^-64`` (exact), which gives the same
    result while keeping ``1 / s`` out of the subnormal range that XLA/CPU flushes to zero (without
    it, ``x / 1e38`` would give 0).  Kernels whose scales are far from f32 overflow can skip that.
    """
    x = jnp.asarray(x, jnp.float32)
    s = jnp.asarray(s, jnp.float32)
    c = jnp.where(jnp.abs(s) >= jnp.float32(2.0 ** 64), jnp.float32(2.0 ** -64), jnp.float32(1))
    return (x * c) * (jnp.float32(1) / (s * c))


@jax.jit
def e2m1_encode(x):
    """float -> uint8 e2m1 codes (low 4 bits): round-to-nearest-even, saturating at +-6.

    Bit-identical to XLA's f32 -> float4_e2m1fn convert, including -0 -> 0x8 and NaN -> 0x8.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    a = jnp.abs(x)
    mag = jnp.zeros(x.shape, jnp.uint8)
    for t, up in _E2M1_STEPS:
        mag = mag + ((a >= t) if up else (a > t)).astype(jnp.uint8)
    sign = (lax.bitcast_convert_type(x, jnp.uint32) >> jnp.uint32(31)).astype(jnp.uint8)
    sign = sign | jnp.isnan(x).astype(jnp.uint8)
    return (sign << jnp.uint8(3)) | mag


@jax.jit
def e2m1_decode(codes):
    """uint8 e2m1 codes (low 4 bits) -> float32, by building the f32 bit pattern."""
    c = jnp.asarray(codes).astype(jnp.uint32) & jnp.uint32(0xF)
    e = (c >> jnp.uint32(1)) & jnp.uint32(3)
    m = c & jnp.uint32(1)
    normal = ((e + jnp.uint32(126)) << jnp.uint32(23)) | (m << jnp.uint32(22))
    subnormal = m * jnp.uint32(0x3F000000)  # 0.5 or +0
    bits = jnp.where(e == 0, subnormal, normal) | ((c >> jnp.uint32(3)) << jnp.uint32(31))
    return lax.bitcast_convert_type(bits, jnp.float32)


@functools.partial(jax.jit, static_argnames="four_over_six")
def nvfp4_global_scale(x, four_over_six=False):
    """fp32 scalar ``amax(|x|) * f32(1 / 2688)`` over the finite entries of ``x``; 1.0 if that is 0.

    (``amax / 2688`` as XLA compiles it: within one f32 ulp of the true quotient.)  With
    ``four_over_six`` it is ``amax * f32(1 / 1536)`` (6 * 256, see the module doc).
    """
    a = jnp.abs(jnp.asarray(x).astype(jnp.float32))
    amax = jnp.max(jnp.where(jnp.isfinite(a), a, 0.0), initial=0.0)
    g = amax * (_INV_1536 if four_over_six else _INV_2688)
    return jnp.where(g > 0, g, jnp.float32(1.0)).astype(jnp.float32)


@jax.jit
def nvfp4_encode(xs, scale):
    """e2m1 codes of global-scaled values ``xs`` under f32 block scales ``scale`` (broadcast against ``xs``).

    The elementwise half of :func:`nvfp4_block_quant`: ``e2m1(clip(xs * (1 / scale), -6, 6))``, codes 0
    where the scale is 0 (GPTQ reuses it column by column under a block scale fixed earlier).
    """
    sf = jnp.asarray(scale, jnp.float32)
    q = jnp.clip(div_by_scale(xs, sf), -E2M1_MAX, E2M1_MAX)
    return jnp.where(sf == 0, jnp.uint8(0), e2m1_encode(q))


def _block_scale(bamax, inv_max, finite):
    """e4m3 block scale ``bamax * inv_max`` (clipped to 448 BEFORE the cast); NaN for non-finite blocks."""
    s = jnp.clip(bamax * inv_max, 0.0, jnp.float32(E4M3_MAX))
    s = lax.optimization_barrier(s.astype(jnp.float8_e4m3fn))
    return jnp.where(finite, s, jnp.array(jnp.nan, jnp.float8_e4m3fn))


def _block_squared_error(xs, codes, sf):
    """``sum_block (e2m1(codes) * sf - xs)^2`` in the fixed order of the module doc (adjacent pairwise sums)."""
    d = e2m1_decode(codes) * sf - xs
    e = lax.optimization_barrier(d * d)  # no FMA contraction into the first sum
    while e.shape[-1] > 1:
        e = e[..., 0::2] + e[..., 1::2]
    return e


@functools.partial(jax.jit, static_argnames="four_over_six")
def nvfp4_block_quant(x, global_scale=None, four_over_six=False):
    """Quantize along the LAST axis in blocks of 16.

    Returns ``(codes, scales)``: uint8 e2m1 codes ``[..., K]`` (unpacked, one per byte) and
    float8_e4m3fn scales ``[..., K // 16]``.  ``global_scale`` (fp32, a scalar or anything that
    broadcasts against ``[..., K // 16, 1]``) defaults to :func:`nvfp4_global_scale` of ``x``.
    ``four_over_six``: per block the lower-error of the scales mapping the amax to 6 or to 4 (module doc).
    """
    x = jnp.asarray(x)
    k = x.shape[-1]
    if k % NVFP4_BLOCK:
        raise ValueError(f"nvfp4_block_quant: last axis of shape {tuple(x.shape)} is not a multiple of 16")
    g = nvfp4_global_scale(x, four_over_six) if global_scale is None else jnp.asarray(global_scale, jnp.float32)
    xb = x.reshape(*x.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    xs = div_by_scale(xb.astype(jnp.float32), g)
    bamax = jnp.max(jnp.abs(xs), axis=-1, keepdims=True)
    finite = jnp.all(jnp.isfinite(xb), axis=-1, keepdims=True)
    s = _block_scale(bamax, _INV_6, finite)
    sf = s.astype(jnp.float32)
    codes = nvfp4_encode(xs, sf)
    if four_over_six:
        s4 = _block_scale(bamax, _INV_4, finite)
        sf4 = s4.astype(jnp.float32)
        codes4 = nvfp4_encode(xs, sf4)
        use4 = _block_squared_error(xs, codes4, sf4) < _block_squared_error(xs, codes, sf)
        codes = jnp.where(use4, codes4, codes)
        s = jnp.where(use4, s4, s)
    return codes.reshape(x.shape), s[..., 0]


@functools.partial(jax.jit, static_argnames="dtype")
def nvfp4_block_dequant(codes, scales, global_scale, dtype=jnp.float32):
    """Inverse of :func:`nvfp4_block_quant`: ``(e2m1(codes) * scale) * global`` in f32, then cast.

    ``codes`` uint8 ``[..., K]`` (unpacked), ``scales`` ``[..., K // 16]``; ``global_scale`` must
    broadcast against ``[..., 1, 1]`` (a scalar, or one value per leading index).
    """
    codes = jnp.asarray(codes)
    k = codes.shape[-1]
    q = e2m1_decode(codes).reshape(*codes.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    g = jnp.asarray(global_scale, jnp.float32)
    g = g.reshape(g.shape + (1,) * (q.ndim - g.ndim))
    y = (q * jnp.asarray(scales).astype(jnp.float32)[..., None]) * g
    return y.reshape(codes.shape).astype(dtype)
