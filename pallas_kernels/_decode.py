"""Packed-operand decoders for the GEMM K loop: PTX on packed registers (CUDA) + a bit-identical jnp twin.

Each decoder is elementwise over a ``uint8`` tile of packed codes ``c [rows, n]`` (byte ``j`` holds codes
``2j`` (low nibble) and ``2j + 1`` (high nibble), both in the same 16-block / INT group) and returns one
*plane* per nibble: plane[r, j] decodes the low (or high) nibble of byte ``c[r, j]``.  A dot over K is
invariant to a permutation of K applied to both operands, so ``x @ w.T == lo_x @ lo_w.T + hi_x @ hi_w.T``:
no interleaving in the K loop.

On CUDA the decoders are ``elementwise_inline_asm(pack=4)``: one 32-bit register carries 4 code bytes and
a handful of ``prmt`` / ``and`` / ``shr`` / ``lop3`` build the fp16 bit patterns of 4 codes at once
(vLLM Marlin's fp4 trick).  The Pallas interpreter cannot run PTX, so ``asm=False`` computes the same bits
with jnp; ``tests/test_gemm.py`` runs the PTX strings through a small emulator and compares all 256 bytes.

NVFP4 (``nvfp4_planes``): e2m1 code ``c`` -> fp16 bits ``(c & 8) << 12 | (c & 7) << 9``, which is exactly
``e2m1(c) * 2^-14`` (the e2m1 subnormal 0.5 lands on an fp16 subnormal), times the block scale as an exact
fp16 (``e4m3_to_f16``): ``q * s * 2^-14`` is exact in fp16 for every code and every e4m3 scale (<= 6
significant bits, >= 2^-24, <= 0.17), so the fp16 MMA sees exact operands; the GEMM multiplies its fp32
accumulator by 2^28 (two operands) before the global scales.

INT4 (``int4_planes_s8``): the low nibble ``(byte << 4) & 0xF0`` and the high nibble ``byte & 0xF0`` read as
int8 are exactly ``16 * signed_code``: s8 x s8 -> s32 MMA is exact, the 1/256 folds into the group rescale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

__all__ = ["NVFP4_ASM", "INT4_ASM", "e4m3_to_f16", "nvfp4_planes", "int4_planes_s8", "F16_SCALE"]

F16_SCALE = 2.0 ** -14  # what the e2m1 -> fp16 bit pattern multiplies each code by

# $0, $1: 4 fp16 (two f16x2); $2: 4 code bytes; $3, $4: the 4 elements' fp16 scales (two f16x2).
# prmt puts byte 0 / byte 1 (then 2 / 3) in the HIGH byte of each 16-bit half: the high nibble's sign is then
# at bit 15 and its magnitude at bits 12..14 (>> 3 -> 9..11); << 4 first for the low nibble.
_NVFP4_BODY = """prmt.b32 t, $2, 0, {sel};{pre}
and.b32 u, t, 0x70007000;
shr.b32 u, u, 3;
lop3.b32 v, t, u, 0x80008000, 0xEC;
mul.rn.f16x2 {out}, v, {scale};"""
NVFP4_ASM = {
    nib: "{\n.reg .b32 t, u, v;\n" + "\n".join(
        _NVFP4_BODY.format(sel=sel, pre="\nshl.b32 t, t, 4;" if nib == "lo" else "", out=out, scale=scale)
        for sel, out, scale in (("0x1000", "$0", "$3"), ("0x3222", "$1", "$4"))) + "\n}"
    for nib in ("lo", "hi")
}
# $0: 4 int8 planes values; $1: 4 code bytes
INT4_ASM = {"lo": "{\n.reg .b32 t;\nshl.b32 t, $1, 4;\nand.b32 $0, t, 0xF0F0F0F0;\n}",
            "hi": "and.b32 $0, $1, 0xF0F0F0F0;"}


def e4m3_to_f16(b):
    """uint8/int32 float8_e4m3fn bits -> the exact value as float16 (0x7F / 0xFF -> NaN).

    ``(b & 0x80) << 8 | (b & 0x7F) << 7`` is the fp16 pattern of ``e4m3 * 2^-8`` (subnormals included);
    times 256 is exact (|e4m3| <= 448).
    """
    b = b.astype(jnp.int32)
    bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    v = lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16) * jnp.float16(256.0)
    return jnp.where((b & 0x7F) == 0x7F, jnp.float16(jnp.nan), v)


def _e2m1_f16_twin(code):
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16)


def nvfp4_planes(c, scale16, *, asm: bool):
    """``c [R, n]`` uint8 codes, ``scale16 [R, n]`` fp16 block scale of each byte -> (lo, hi) fp16 planes."""
    if asm:
        return tuple(plt.elementwise_inline_asm(
            NVFP4_ASM[nib], args=[c, scale16], constraints="=r,=r,r,r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.float16)])[0] for nib in ("lo", "hi"))
    ci = c.astype(jnp.int32)
    return _e2m1_f16_twin(ci & 15) * scale16, _e2m1_f16_twin(ci >> 4) * scale16


def int4_planes_s8(c, *, asm: bool):
    """``c [R, n]`` uint8 two's complement nibble pairs -> (lo, hi) int8 planes holding ``16 * code``."""
    if asm:
        return tuple(plt.elementwise_inline_asm(
            INT4_ASM[nib], args=[c], constraints="=r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.int8)])[0] for nib in ("lo", "hi"))
    ci = c.astype(jnp.int32)
    lo = ((ci << 4) & 0xF0).astype(jnp.uint8)
    hi = (ci & 0xF0).astype(jnp.uint8)
    return lax.bitcast_convert_type(lo, jnp.int8), lax.bitcast_convert_type(hi, jnp.int8)
