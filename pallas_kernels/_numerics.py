"""Element-wise quantization arithmetic that runs INSIDE a Pallas Triton kernel.

Everything here is plain ``jnp``/``lax`` on float32 / int32 arrays using only ops with a Triton
lowering rule: shifts, masks, compares, ``where``, min/max, int<->float converts and bitcasts of
equal width.  No gathers, no float8/float4 dtypes (sm_80 cannot convert float8 in Triton, and a
``uint4 -> float4_e2m1fn`` bitcast does not lower), no ``lax.clamp``/``lax.round``.

The same functions run on CPU (interpret mode) and are tested exhaustively against
:mod:`pqjax.formats` / ml_dtypes in ``tests/test_kernels.py`` and ``tests/test_quantize_activation.py``.

Division (see :func:`div`): exact ties of the e2m1 / INT rounding are COMMON (bf16 inputs have 8
significant bits, e4m3 scales 4), so the result of ``x / s`` must be correctly rounded for the
codes to be well defined.  Triton lowers an f32 ``/`` to the approximate ``div.full.f32`` (up to
2 ulp off) and XLA rewrites ``a / broadcast(b)`` into ``a * (1 / b)``; the kernels therefore use
``div.rn.f32`` (inline PTX) on CUDA and a barrier-protected XLA division in interpret mode: IEEE
division everywhere, i.e. exactly the formulas of :mod:`pqjax.formats.nvfp4` evaluated in IEEE float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["div", "round_e4m3", "clip", "interleave2", "interleave8", "e2m1_code", "e4m3_code", "rint_small",
           "fwht"]

_F32 = jnp.float32
_I32 = jnp.int32


def div(a, b, mode: str = "ieee"):
    """``a / b`` in float32.

    * ``"rn"``: inline PTX ``div.rn.f32`` (correctly rounded; CUDA Triton only).
    * ``"ieee"``: correctly rounded XLA division (interpret mode / CPU).  Both operands pass
      through an optimization barrier because XLA's algebraic simplifier rewrites
      ``a / broadcast(b)`` into ``a * broadcast(1 / b)`` and ``(a / b) / c`` into
      ``a / (b * c)``; neither is correctly rounded, and both break the exact ties of the e2m1 /
      INT rounding differently.
    * ``"native"``: the plain ``/`` (Triton: approximate ``div.full.f32``; XLA: may be rewritten).
    """
    a = jnp.asarray(a, _F32)
    b = jnp.asarray(b, _F32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    if mode == "native":
        return a / b
    a = jnp.broadcast_to(a, shape)
    b = jnp.broadcast_to(b, shape)
    if mode == "ieee":
        a, b = lax.optimization_barrier((a, b))
        return a / b
    if mode != "rn":
        raise ValueError(f"unknown division mode {mode!r}")
    from jax.experimental.pallas import triton as plt

    [out] = plt.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, _F32)],
    )
    return out


def clip(x, lo, hi):
    """``min(max(x, lo), hi)`` (``jnp.clip`` is the same, spelled out so the lowering is obvious)."""
    return jnp.minimum(jnp.maximum(x, lo), hi)


def round_e4m3(v):
    """Round float32 ``v`` in [0, 448] to the float8_e4m3fn grid, nearest-even (incl. subnormals).

    Returns the rounded value as float32 (exactly what ``v.astype(float8_e4m3fn)`` represents).
    """
    bits = lax.bitcast_convert_type(v, _I32)
    lsb = (bits >> 20) & 1
    normal = lax.bitcast_convert_type((bits + (0x7FFFF + lsb)) & -0x100000, _F32)  # keep 3 mantissa bits
    y = v * 512.0  # subnormal range [0, 2^-6): quantum 2^-9; exact scaling
    n = y.astype(_I32)  # y >= 0: truncation == floor
    d = y - n.astype(_F32)
    up = (d > 0.5) | ((d == 0.5) & ((n & 1) == 1))
    sub = (n + jnp.where(up, 1, 0)).astype(_F32) * (1.0 / 512.0)
    return jnp.where(v < 2.0 ** -6, sub, normal)


def interleave2(a, b):
    """``[R, n]`` x2 -> ``[R, 2n]`` with ``out[:, 2i] = a[:, i]``, ``out[:, 2i+1] = b[:, i]`` (tt.join)."""
    r, n = a.shape
    return jnp.stack([a, b], axis=-1).reshape(r, 2 * n)


def interleave8(planes):
    """8 planes ``[R, n]`` -> ``[R, 8n]`` with ``out[:, 8i + j] = planes[j][:, i]`` (3 levels of join)."""
    c = planes
    p0, p1, p2, p3 = interleave2(c[0], c[4]), interleave2(c[2], c[6]), interleave2(c[1], c[5]), interleave2(c[3], c[7])
    q0, q1 = interleave2(p0, p1), interleave2(p2, p3)  # q0[4i+2h+m] = c[4h+2m][i]; q1: c[4h+2m+1]
    return interleave2(q0, q1)


# --------------------------------------------------------------------------------------------
# bit-pattern encoders (a handful of integer ops per element instead of compare chains)
# --------------------------------------------------------------------------------------------
_TWO22 = 4194304.0  # 2^22: adding it rounds |y| < 2^22 to a multiple of 0.5 (RNE, in hardware)
_TWO22_BITS = 0x4A800000
_MAGIC_RINT = 12582912.0  # 1.5 * 2^23: adding it rounds |y| < 2^22 to an integer (RNE)
_MAGIC_RINT_BITS = 0x4B400000


def e2m1_code(y):
    """float32 ``y`` in [-6, 6] -> int32 e2m1 code (0..15), round-to-nearest-even; = ``formats.e2m1_encode``.

    |y| < 1 (zero / the subnormal 0.5 / rounding up to 1): ``bits(|y| + 2^22) - bits(2^22)`` counts halves.
    |y| >= 1: round the f32 significand to 1 bit (RNE) and read exponent+mantissa off the bits:
    ``(rounded_bits >> 22) - 252`` is ``(e2m1 exponent << 1) | mantissa``.  The sign is bit 31 (-0 -> 8).
    NaN is not handled here (callers force their NaN blocks).
    """
    bits = lax.bitcast_convert_type(y, _I32)
    a = lax.bitcast_convert_type(bits & 0x7FFFFFFF, _F32)
    sub = lax.bitcast_convert_type(a + _TWO22, _I32) - _TWO22_BITS
    ab = bits & 0x7FFFFFFF
    normal = ((ab + (0x1FFFFF + ((ab >> 22) & 1))) >> 22) - 252
    mag = jnp.where(a < 1.0, sub, normal)
    return mag | ((bits >> 28) & 8)


def e4m3_code(v):
    """float32 ``v``: a non-negative float8_e4m3fn value (from :func:`round_e4m3`) or NaN -> int32 e4m3 bits."""
    bits = lax.bitcast_convert_type(v, _I32)
    normal = (bits >> 20) - ((127 - 7) << 3)  # rebias the exponent, keep 3 mantissa bits
    sub = (v * 512.0).astype(_I32)  # v < 2^-6: an exact multiple of 2^-9
    code = jnp.where(v < 2.0 ** -6, sub, normal)
    return jnp.where(v != v, 0x7F, code)


def rint_small(y):
    """float32 ``y`` with ``|y| < 2^22`` -> nearest integer, ties to even, as int32 (``jnp.round``)."""
    return lax.bitcast_convert_type(y + _MAGIC_RINT, _I32) - _MAGIC_RINT_BITS


def fwht(planes):
    """Unnormalized Walsh-Hadamard transform across a list of ``2^n`` equal-shape float32 planes.

    ``out[i] = sum_j H[i, j] planes[j]`` with the Sylvester ``H`` (:func:`pallas_kernels.hadamard_matrix`),
    evaluated as the in-place butterfly ``(a, b) -> (a + b, a - b)`` at strides 1, 2, 4, ...: ``log2(n)``
    adds per element, and one fixed order of float32 operations that XLA and Triton both execute as written.
    """
    p = list(planes)
    n = len(p)
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-2 number of planes, got {n}")
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                p[j], p[j + h] = p[j] + p[j + h], p[j] - p[j + h]
        h *= 2
    return p
