"""The one safetensors reader and writer (pqjax's files, converters' FLUX / CLIP / T5 / VAE weights, embeddings).

Format: 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data region;
offsets are relative to the start of the data region.

The header is parsed here, not by the ``safetensors`` package, whose numpy loader cannot read BF16, F8 or F4:
:data:`DTYPES` is the one table of safetensors dtype names and their numpy (``ml_dtypes``) dtypes.
``SafetensorsFile.read`` maps only the bytes of one tensor, converts them (a fresh, owned array) and unmaps them
again, so a loader that reads tensors one by one never holds more than one source tensor besides what it has
already converted. :func:`save_file` writes a file atomically (:mod:`pqjax.io.atomic`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
import weakref
from typing import Mapping

import ml_dtypes
import numpy as np

from pqjax.io.atomic import atomic_write

__all__ = ["DTYPES", "FLOAT_DTYPES", "SafetensorsError", "SafetensorsFile", "TensorInfo", "ReadStats", "READ_STATS",
           "save_file"]

#: safetensors dtype name -> numpy dtype (every dtype pqjax reads or writes).
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_NAME_OF = {v: k for k, v in DTYPES.items()}
#: the dtypes of float model weights (what the converters accept).
FLOAT_DTYPES = ("BF16", "F16", "F32")
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


class SafetensorsError(ValueError):
    """A file is not a readable safetensors file (or a tensor has a dtype that is not accepted)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class ReadStats:
    """Counts tensors that ``SafetensorsFile.read`` has materialized and that are still alive.

    ``peak_live`` / ``peak_live_bytes`` tell whether a loader ever held several source tensors at
    once (tests use this to prove loading is one tensor at a time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        """Zero the read count and restart the peaks from what is alive now."""
        if not hasattr(self, "live"):
            self.live = self.live_bytes = 0
        self.reads = 0
        self.peak_live, self.peak_live_bytes = self.live, self.live_bytes

    def _add(self, arr: np.ndarray):
        n = arr.nbytes
        with self._lock:
            self.reads += 1
            self.live += 1
            self.live_bytes += n
            self.peak_live = max(self.peak_live, self.live)
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(arr, self._drop, n)

    def _drop(self, n: int):
        with self._lock:
            self.live -= 1
            self.live_bytes -= n


READ_STATS = ReadStats()


class SafetensorsFile:
    """Header of one ``.safetensors`` file; tensors are read on demand with :meth:`read`.

    ``error``: the exception type raised for a bad file or dtype (callers name their own, e.g.
    ``converters.ConversionError``, ``pqjax.io.CheckpointError``); messages always start with the path."""

    def __init__(self, path, *, error: type[Exception] = SafetensorsError):
        self.path = os.fspath(path)
        self.error = error
        self.tensors, self.metadata = _parse_header(self.path, error)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def check_dtype(self, key: str, allowed=None) -> np.dtype:
        """The numpy dtype of tensor ``key``; ``error`` if its dtype is unknown or not in ``allowed`` (names)."""
        dt = self.tensors[key].dtype
        ok = tuple(DTYPES) if allowed is None else tuple(allowed)
        if dt not in ok or dt not in DTYPES:
            raise self.error(f"{self.path}: tensor {key!r} has dtype {dt}, which is not supported "
                             f"(supported: {', '.join(ok)})")
        return DTYPES[dt]

    def read(self, key: str, dtype=None) -> np.ndarray:
        """The tensor as a fresh numpy array (converted to ``dtype`` if given; RNE rounding)."""
        info = self.tensors[key]
        src = self.check_dtype(key)
        out_dtype = np.dtype(dtype) if dtype is not None else src
        if info.end == info.begin:
            out = np.zeros(info.shape, out_dtype)
        else:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.begin, shape=(info.end - info.begin,))
            out = mm.view(src).reshape(info.shape).astype(out_dtype, copy=True)
            del mm  # unmapped as soon as the last reference goes
        READ_STATS._add(out)
        return out


def _parse_header(path: str, error: type[Exception]):
    def bad(what: str):
        return error(f"{path}: corrupt or truncated safetensors file: {what}")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"file is {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise bad(f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
            if 8 + n > size:
                raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise error(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"entry {key!r} is malformed: {entry!r}; expected "
                      "{'dtype': str, 'shape': [int, ...], 'data_offsets': [begin, end]}")
        if not 0 <= begin <= end:
            raise bad(f"tensor {key!r} has invalid data_offsets [{begin}, {end}]")
        if end > data_size:
            raise bad(f"tensor {key!r} ends at byte {end} of the data region, "
                      f"but the file only has {data_size} data bytes")
        if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise bad(f"tensor {key!r}: {dtype} {tuple(shape)} needs {math.prod(shape) * DTYPES[dtype].itemsize} "
                      f"bytes, but data_offsets span {end - begin}")
        tensors[key] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
    return tensors, metadata


def save_file(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, *,
              overwrite: bool = True, error: type[Exception] = SafetensorsError) -> str:
    """Write ``tensors`` (name -> array of a :data:`DTYPES` dtype) and string ``metadata`` to ``path``, atomically.

    Readable by the ``safetensors`` package, diffusers and transformers. Returns the absolute path."""
    arrays = {name: np.asarray(a, order="C") for name, a in tensors.items()}  # (ascontiguousarray makes 0-d 1-d)
    header, offset = {}, 0
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype not in _NAME_OF:
            raise error(f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot store")
        header[name] = {"dtype": _NAME_OF[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise error(f"{path}: safetensors metadata must map strings to strings; not so for {bad[:3]}")
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
    with atomic_write(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in sorted(arrays):
                f.write(arrays[name].tobytes())
    return os.path.abspath(os.fspath(path))
