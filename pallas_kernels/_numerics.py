"""Element-wise quantization arithmetic that runs INSIDE a Pallas Triton kernel.

Everything here is plain ``jnp``/``lax`` on float32 / int32 arrays using only ops with a Triton
lowering rule: shifts, masks, compares, ``where``, min/max, int<->float converts and bitcasts of
equal width.  No gathers, no float8/float4 dtypes (sm_80 cannot convert float8 in Triton, and a
``uint4 -> float4_e2m1fn`` bitcast does not lower), no ``lax.clamp``/``lax.round``.

The same functions run on CPU (interpret mode) and are tested exhaustively against
:mod:`pqjax.formats` / ml_dtypes in ``tests/test_kernels.py``.

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

__all__ = ["div", "e2m1_value", "e4m3_value", "round_e4m3", "round_e2m1", "round_half_even",
           "clip", "interleave2", "interleave8"]

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


def _pow2(e):
    """2.0**e for an int32 array ``e`` in the normal f32 exponent range, via the bit pattern."""
    return lax.bitcast_convert_type((e + 127) << 23, _F32)


def e2m1_value(c):
    """int32 e2m1 codes (low 4 bits: sign, 2-bit exponent, 1-bit mantissa) -> float32 value."""
    e = (c >> 1) & 3
    m = c & 1
    twice = jnp.where(e == 0, m, (m + 2) << jnp.maximum(e - 1, 0))  # 2 * |value|, an integer
    v = twice.astype(_F32) * 0.5
    return jnp.where((c & 8) != 0, -v, v)


def e4m3_value(b):
    """int32 float8_e4m3fn bit patterns (0..255) -> float32 value (0x7F / 0xFF -> NaN)."""
    e = (b >> 3) & 15
    m = b & 7
    mant = jnp.where(e == 0, m, m + 8)
    v = mant.astype(_F32) * _pow2(jnp.maximum(e, 1) - 10)
    v = jnp.where((b & 128) != 0, -v, v)
    return jnp.where((b & 127) == 127, jnp.nan, v)


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


# (threshold, tie rounds up?) on |y| between consecutive e2m1 magnitudes 0,.5,1,1.5,2,3,4,6; the
# value added when crossing.  A tie rounds to the even code (mantissa bit 0).
_E2M1_STEPS = ((0.25, False, 0.5), (0.75, True, 0.5), (1.25, False, 0.5), (1.75, True, 0.5),
               (2.5, False, 1.0), (3.5, True, 1.0), (5.0, False, 2.0))


def round_e2m1(y):
    """float32 ``y`` in [-6, 6] -> nearest-even e2m1 VALUE (float32), i.e. ``e2m1_decode(e2m1_encode(y))``."""
    a = jnp.abs(y)
    v = jnp.zeros_like(a)
    for t, up, step in _E2M1_STEPS:
        v = v + jnp.where((a >= t) if up else (a > t), step, 0.0)
    return jnp.where(y < 0, -v, v)


def round_half_even(y):
    """float32 ``y`` with ``|y| < 2^31`` -> nearest integer, ties to even (float32)."""
    a = jnp.abs(y)
    n = a.astype(_I32)
    d = a - n.astype(_F32)
    up = (d > 0.5) | ((d == 0.5) & ((n & 1) == 1))
    r = (n + jnp.where(up, 1, 0)).astype(_F32)
    return jnp.where(y < 0, -r, r)


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
