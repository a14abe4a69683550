"""QTensor pytree, quantize / fake_quant, and byte accounting."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .intq import INT_GROUP_SIZES, INT_SCALE_DTYPES, int_clip_search, int_group_dequant, int_group_quant
from .nvfp4 import NVFP4_BLOCK, nvfp4_block_dequant, nvfp4_block_quant, nvfp4_global_scale
from .packing import pack_3bit, pack_4bit, unpack_3bit, unpack_4bit

__all__ = ["FORMATS", "FORMAT_BITS", "DEFAULT_INT_GROUP", "resolve_group", "QTensor", "quantize", "fake_quant",
           "nbytes"]

FORMATS = ("nvfp4", "int4", "int3")
FORMAT_BITS = {"nvfp4": 4, "int4": 4, "int3": 3}
DEFAULT_INT_GROUP = 64


def resolve_group(fmt: str, group_size: int | None = None) -> int:
    """The block/group size along K of ``fmt``: 16 for nvfp4 (fixed), ``group_size`` (default 64) for INT formats.

    The one place that decides it; ValueError for an unknown format or a size the format does not take."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "nvfp4":
        if group_size not in (None, NVFP4_BLOCK):
            raise ValueError(f"nvfp4 uses a fixed block size of {NVFP4_BLOCK}, got group_size={group_size}")
        return NVFP4_BLOCK
    group_size = DEFAULT_INT_GROUP if group_size is None else group_size
    if group_size not in INT_GROUP_SIZES:
        raise ValueError(f"{fmt} group_size must be one of {INT_GROUP_SIZES}, got {group_size}")
    return int(group_size)


@dataclasses.dataclass(frozen=True, eq=False)
class QTensor:
    """A packed quantized tensor (a pytree: children ``codes, scales, global_scale``).

    Storage moves the reduction ``axis`` LAST.  For a logical shape whose ``axis`` has length K and
    whose other dims (in order) are ``R...``:

    * ``codes``: uint8 ``[*R, K // 2]`` (nvfp4, int4: low nibble = even element) or
      ``[*R, 3K // 8]`` (int3: 8 codes per 3 bytes, see :mod:`pqjax.formats.packing`);
    * ``scales``: ``[*R, K // group_size]``, float8_e4m3fn (nvfp4) or the INT scale dtype;
    * ``global_scale``: fp32 scalar array for nvfp4, ``None`` for INT formats (no global scale).

    A Flax kernel ``W[K, N]`` quantized with ``axis=0`` is stored as codes ``[N, K // 2]`` and
    scales ``[N, K // 16]``: row-major per output channel.

    Static metadata: ``fmt, group_size, shape`` (logical shape), ``axis`` (non-negative), ``dtype``
    (logical dtype name; the default of :meth:`dequantize`).

    Stacked QTensors (from ``jax.vmap(quantize)``, e.g. one per layer) carry extra LEADING dims on
    every child while ``shape`` stays the per-instance shape; :meth:`dequantize` and
    :meth:`codes_unpacked` then return those leading dims first.  ``jax.vmap`` / ``lax.scan`` over
    such a stack see ordinary per-instance QTensors.
    """

    codes: Any
    scales: Any
    global_scale: Any
    fmt: str
    group_size: int
    shape: tuple
    axis: int
    dtype: str

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return FORMAT_BITS[self.fmt]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def storage_shape(self) -> tuple:
        """Logical shape with ``axis`` moved last (the unpacked codes' per-instance shape)."""
        s = list(self.shape)
        k = s.pop(self.axis)
        return tuple(s) + (k,)

    @property
    def batch_shape(self) -> tuple:
        """Leading stack dims (empty unless built by ``jax.vmap(quantize)``)."""
        return tuple(self.codes.shape[: len(self.codes.shape) - len(self.shape)])

    @property
    def nbytes(self) -> int:
        """True stored bytes: packed codes + scales + global scale (works on abstract leaves)."""
        return sum(_leaf_nbytes(c) for c in (self.codes, self.scales, self.global_scale) if c is not None)

    # ---- decoding -----------------------------------------------------------------------------
    def codes_unpacked(self):
        """Codes one per element, storage layout ``[*batch, *R, K]``.

        int4/int3: sign-extended int8 integers in ``[-qmax, qmax]``; nvfp4: uint8 e2m1 bit patterns.
        """
        if self.fmt == "int3":
            return unpack_3bit(self.codes, signed=True)
        return unpack_4bit(self.codes, signed=self.fmt != "nvfp4")

    def dequantize(self, dtype=None):
        """Array of the logical shape (with any stack dims leading), in ``dtype`` (default: logical)."""
        dtype = jnp.dtype(self.dtype if dtype is None else dtype)
        return _dequantize(self.codes, self.scales, self.global_scale, fmt=self.fmt,
                           nd=len(self.shape), axis=self.axis, dtype=dtype.name)

    def __repr__(self):
        return (f"QTensor(fmt={self.fmt!r}, shape={self.shape}, axis={self.axis}, group_size={self.group_size}, "
                f"dtype={self.dtype!r}, codes={_shape_str(self.codes)}, scales={_shape_str(self.scales)})")


jax.tree_util.register_dataclass(
    QTensor,
    data_fields=["codes", "scales", "global_scale"],
    meta_fields=["fmt", "group_size", "shape", "axis", "dtype"],
)


def _shape_str(a):
    if a is None:
        return "None"
    return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


def _leaf_nbytes(a) -> int:
    if a is None:
        return 0
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return int(math.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
    return int(np.asarray(a).nbytes)


def nbytes(tree) -> int:
    """Total bytes of a pytree of arrays / QTensors / ``jax.ShapeDtypeStruct`` leaves."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda l: isinstance(l, QTensor))
    return sum(l.nbytes if isinstance(l, QTensor) else _leaf_nbytes(l) for l in leaves)


# ---- quantize ---------------------------------------------------------------------------------
def _check_args(x, fmt, group_size, global_scale, axis, scale_dtype, four_over_six=False, clip_grid=None):
    group_size = resolve_group(fmt, group_size)
    if four_over_six and fmt != "nvfp4":
        raise ValueError(f"four_over_six applies to nvfp4 only, not {fmt}")
    if clip_grid is not None and fmt == "nvfp4":
        raise ValueError("clip_grid (INT clip search) applies to int4 / int3 only, not nvfp4")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize(fmt={fmt!r}) needs a floating-point input, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"quantize(fmt={fmt!r}) needs at least a 1-d input, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} out of range for shape {tuple(x.shape)}")
    axis = axis % x.ndim
    if fmt == "nvfp4":
        if scale_dtype is not None and jnp.dtype(scale_dtype) != jnp.dtype(jnp.float8_e4m3fn):
            raise ValueError(f"nvfp4 scales are float8_e4m3fn, got scale_dtype={scale_dtype}")
        scale_dtype = jnp.dtype(jnp.float8_e4m3fn)
        if global_scale is not None and jnp.ndim(global_scale) != 0:
            raise ValueError(f"nvfp4 global_scale must be a scalar, got shape {jnp.shape(global_scale)}")
    else:
        if global_scale is not None:
            raise ValueError(f"global_scale applies to nvfp4 only, not {fmt}")
        scale_dtype = jnp.dtype(jnp.bfloat16 if scale_dtype is None else scale_dtype)
        if scale_dtype.name not in INT_SCALE_DTYPES:
            raise ValueError(f"{fmt} scale_dtype must be one of {INT_SCALE_DTYPES}, got {scale_dtype}")
    k = x.shape[axis]
    pack = 8 if fmt == "int3" else 2
    if k == 0 or k % group_size or k % pack:
        raise ValueError(
            f"quantize(fmt={fmt!r}): reduction axis {axis} of shape {tuple(x.shape)} has length {k}, "
            f"which must be a positive multiple of group_size={group_size}"
            + (f" and of {pack} (packing)" if group_size % pack else ""))
    return axis, group_size, scale_dtype


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "axis", "scale_dtype", "four_over_six", "clip_grid"))
def _quantize(x, global_scale, *, fmt, group_size, axis, scale_dtype, four_over_six=False, clip_grid=None):
    xm = jnp.moveaxis(x, axis, -1)
    if fmt == "nvfp4":
        g = nvfp4_global_scale(x, four_over_six) if global_scale is None else jnp.asarray(global_scale, jnp.float32)
        codes, scales = nvfp4_block_quant(xm, g, four_over_six)
        return pack_4bit(codes), scales, g
    if clip_grid is None:
        codes, scales = int_group_quant(xm, FORMAT_BITS[fmt], group_size, scale_dtype)
    else:
        codes, scales, _ = int_clip_search(xm, FORMAT_BITS[fmt], group_size, scale_dtype, clip_grid)
    packed = pack_3bit(codes) if fmt == "int3" else pack_4bit(codes)
    return packed, scales, None


@functools.partial(jax.jit, static_argnames=("fmt", "nd", "axis", "dtype"))
def _dequantize(codes, scales, global_scale, *, fmt, nd, axis, dtype):
    nb = codes.ndim - nd  # leading stack dims
    if fmt == "nvfp4":
        y = nvfp4_block_dequant(unpack_4bit(codes), scales, global_scale, dtype)
    elif fmt == "int4":
        y = int_group_dequant(unpack_4bit(codes, signed=True), scales, dtype)
    else:
        y = int_group_dequant(unpack_3bit(codes, signed=True), scales, dtype)
    return jnp.moveaxis(y, -1, nb + axis)


def quantize(x, fmt, *, group_size=None, global_scale=None, axis=-1, scale_dtype=None, four_over_six=False,
             clip_grid=None) -> QTensor:
    """Quantize ``x`` to ``fmt`` in blocks/groups along ``axis``; returns a packed :class:`QTensor`.

    ``fmt``: "nvfp4" (group 16 fixed, e4m3 scales, fp32 ``global_scale`` = amax / NVFP4_RANGE of the
    finite entries unless given), "int4" / "int3" (``group_size`` in (32, 64, 128), default 64;
    ``scale_dtype`` bfloat16 (default), float16 or float32; no global scale).
    ``four_over_six`` (nvfp4): Four Over Six block scales (default global amax/(6*256)), see
    :mod:`pqjax.formats.nvfp4`. ``clip_grid`` (int4/int3): per-group MSE clip search over these ratios,
    see :func:`pqjax.formats.intq.int_clip_search`. Both still produce the standard packed format.
    Raises ValueError for an unknown format, a bad group size, or a reduction axis length not
    divisible by the group; TypeError for a non-floating input.
    """
    x = jnp.asarray(x)
    axis, group_size, scale_dtype = _check_args(x, fmt, group_size, global_scale, axis, scale_dtype,
                                                four_over_six, clip_grid)
    codes, scales, g = _quantize(x, global_scale, fmt=fmt, group_size=group_size, axis=axis,
                                 scale_dtype=scale_dtype.name, four_over_six=bool(four_over_six),
                                 clip_grid=None if clip_grid is None else tuple(float(r) for r in clip_grid))
    return QTensor(codes, scales, g, fmt=fmt, group_size=group_size, shape=tuple(x.shape), axis=axis,
                   dtype=jnp.dtype(x.dtype).name)


def fake_quant(x, fmt, *, group_size=None, global_scale=None, axis=-1, four_over_six=False, clip_grid=None):
    """``quantize(x, ...).dequantize(x.dtype)``: quantize-dequantize in the input's dtype."""
    x = jnp.asarray(x)
    return quantize(x, fmt, group_size=group_size, global_scale=global_scale, axis=axis,
                    four_over_six=four_over_six, clip_grid=clip_grid).dequantize(x.dtype)
