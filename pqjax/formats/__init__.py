"""Numeric formats: NVFP4 and symmetric per-group INT4 / INT3, packed into uint8; the W4A4 activation spec
(:class:`ActQuant`) and the block Hadamard rotation (:mod:`.hadamard`).

High level::

    q = quantize(w, "nvfp4", axis=0)     # QTensor (pytree); w[K, N] -> codes [N, K//2], scales [N, K//16]
    w_hat = q.dequantize()               # logical shape and dtype again
    fake_quant(w, "int4", axis=0)        # == quantize(...).dequantize(w.dtype), bit for bit
    nbytes(params)                       # packed bytes of a pytree (QTensors, arrays, abstract leaves)

``axis`` is the reduction axis the blocks/groups run along; storage moves it LAST.

Formats (bits per element including scales, K a multiple of the group):

* ``nvfp4``: e2m1 codes, one float8_e4m3fn scale per 16, one fp32 global scale (4.5 bits).
  Bit-identical to ``jax._src.cudnn.scaled_matmul_stablehlo.quantize`` except where that divides
  by zero (zero-scale blocks -> exact zeros here) and for non-finite blocks (NaN here); see
  :mod:`pqjax.formats.nvfp4`.
* ``int4`` / ``int3``: symmetric per-group (group 32/64/128, default 64), ``s = amax / qmax``
  rounded to the scale dtype (bfloat16 by default: INT4 g64 = 4.25 bits, INT3 g64 = 3.25 bits)
  before ``q = clip(round_half_even(x / s), -qmax, qmax)``; ``global_scale`` is ``None``.

Quality options that keep the stored format standard (weights offline; 4/6 also for activations):
``quantize(w, "nvfp4", four_over_six=True)`` (Four Over Six block scales) and
``quantize(w, "int4", clip_grid=DEFAULT_CLIP_GRID)`` (per-group MSE clip search).

Packed layouts (uint8, last axis; see :mod:`pqjax.formats.packing`):

* 4-bit (nvfp4 e2m1 patterns, int4 two's complement nibbles): ``byte i = c[2i] | c[2i+1] << 4``
  (element 0 in the LOW nibble).
* int3: 3-bit two's complement, 8 codes in 3 bytes: code ``k`` of a group of 8 occupies bits
  ``3k .. 3k+2`` of the 24-bit little-endian word ``b0 | b1 << 8 | b2 << 16``.

Non-finite input: a block/group holding NaN or +-Inf gets a NaN scale and dequantizes to all-NaN
(never to finite numbers); the automatic nvfp4 global scale ignores non-finite entries.
"""
from .act_quant import ActQuant
from .hadamard import block_hadamard, hadamard_matrix
from .intq import (
    DEFAULT_CLIP_GRID,
    INT_GROUP_SIZES,
    INT_SCALE_DTYPES,
    int_clip_search,
    int_encode,
    int_group_dequant,
    int_group_quant,
    int_group_scale,
    int_qmax,
)
from .nvfp4 import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MAX_FOUR_OVER_SIX,
    NVFP4_BLOCK,
    NVFP4_RANGE,
    div_by_scale,
    e2m1_decode,
    e2m1_encode,
    nvfp4_block_dequant,
    nvfp4_block_quant,
    nvfp4_encode,
    nvfp4_global_scale,
)
from .packing import pack_3bit, pack_4bit, unpack_3bit, unpack_4bit
from .qtensor import DEFAULT_INT_GROUP, FORMAT_BITS, FORMATS, QTensor, fake_quant, nbytes, quantize, resolve_group

__all__ = [
    "FORMATS", "FORMAT_BITS", "DEFAULT_INT_GROUP", "resolve_group", "QTensor", "quantize", "fake_quant", "nbytes",
    "ActQuant", "hadamard_matrix", "block_hadamard",
    "pack_4bit", "unpack_4bit", "pack_3bit", "unpack_3bit",
    "E2M1_MAX", "E4M3_MAX", "NVFP4_BLOCK", "NVFP4_RANGE", "e2m1_encode", "e2m1_decode", "div_by_scale",
    "nvfp4_global_scale", "nvfp4_block_quant", "nvfp4_block_dequant", "nvfp4_encode", "E4M3_MAX_FOUR_OVER_SIX",
    "INT_GROUP_SIZES", "INT_SCALE_DTYPES", "int_qmax", "int_group_quant", "int_group_dequant",
    "int_group_scale", "int_encode", "int_clip_search", "DEFAULT_CLIP_GRID",
]
