"""Bit packing of 4-bit and 3-bit codes into uint8 (pure shifts and masks, no sub-byte dtypes).

4-bit: two codes per byte along the last axis, element ``2i`` in the LOW nibble and element
``2i + 1`` in the HIGH nibble of byte ``i``:  ``byte = (c[2i] & 0xF) | (c[2i+1] & 0xF) << 4``.

3-bit: eight codes per three bytes along the last axis.  The eight codes of group ``j`` form one
24-bit word ``w = sum_k (c[8j + k] & 7) << 3k`` (code ``k`` occupies bits ``3k .. 3k+2``), stored
little-endian: byte ``3j`` = bits 0..7, byte ``3j+1`` = bits 8..15, byte ``3j+2`` = bits 16..23.

Signed codes are two's complement in their 4 (or 3) bits; ``unpack_*(..., signed=True)``
sign-extends them back to int8.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["pack_4bit", "unpack_4bit", "pack_3bit", "unpack_3bit"]


def _check_last(codes, multiple: int, what: str):
    k = codes.shape[-1] if codes.ndim else 0
    if codes.ndim == 0 or k % multiple:
        raise ValueError(f"{what}: last axis of shape {tuple(codes.shape)} must be a multiple of {multiple}")


@jax.jit
def pack_4bit(codes):
    """uint8/int8 codes ``[..., K]`` (low 4 bits used) -> uint8 ``[..., K // 2]``."""
    codes = jnp.asarray(codes)
    _check_last(codes, 2, "pack_4bit")
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    lo = c[..., 0] & jnp.uint8(0xF)
    hi = c[..., 1] & jnp.uint8(0xF)
    return lo | (hi << jnp.uint8(4))


@functools.partial(jax.jit, static_argnames="signed")
def unpack_4bit(packed, signed: bool = False):
    """uint8 ``[..., n]`` -> ``[..., 2n]`` nibbles (uint8, or sign-extended int8 if ``signed``)."""
    packed = jnp.asarray(packed).astype(jnp.uint8)
    lo = packed & jnp.uint8(0xF)
    hi = packed >> jnp.uint8(4)
    out = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:  # sign-extend in int32: int8 arithmetic fused into a dot operand miscompiles on XLA CPU (jaxlib 0.10)
        out = ((out.astype(jnp.int32) ^ 8) - 8).astype(jnp.int8)
    return out


@jax.jit
def pack_3bit(codes):
    """uint8/int8 codes ``[..., K]`` (low 3 bits used, K % 8 == 0) -> uint8 ``[..., 3K // 8]``."""
    codes = jnp.asarray(codes)
    _check_last(codes, 8, "pack_3bit")
    c = codes.astype(jnp.uint8).astype(jnp.uint32) & jnp.uint32(7)
    c = c.reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    word = c[..., 0]
    for k in range(1, 8):
        word = word | (c[..., k] << jnp.uint32(3 * k))
    b = [((word >> jnp.uint32(8 * i)) & jnp.uint32(0xFF)).astype(jnp.uint8) for i in range(3)]
    return jnp.stack(b, axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 3 // 8)


@functools.partial(jax.jit, static_argnames="signed")
def unpack_3bit(packed, signed: bool = False):
    """uint8 ``[..., 3n]`` -> ``[..., 8n]`` 3-bit codes (uint8, or sign-extended int8 if ``signed``)."""
    packed = jnp.asarray(packed)
    _check_last(packed, 3, "unpack_3bit")
    p = packed.astype(jnp.uint8).astype(jnp.uint32).reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3)
    word = p[..., 0] | (p[..., 1] << jnp.uint32(8)) | (p[..., 2] << jnp.uint32(16))
    c = jnp.stack([(word >> jnp.uint32(3 * k)) & jnp.uint32(7) for k in range(8)], axis=-1)
    out = c.astype(jnp.uint8).reshape(*packed.shape[:-1], packed.shape[-1] // 3 * 8)
    if signed:  # sign-extend in int32 (see unpack_4bit)
        out = ((out.astype(jnp.int32) ^ 4) - 4).astype(jnp.int8)
    return out
