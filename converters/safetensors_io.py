"""Lazy safetensors reading: parse the header ourselves, memory-map one tensor at a time.

Format: 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
region; offsets are relative to the start of the data region.

safetensors' own numpy loader cannot read BF16; we view the bytes as ``ml_dtypes.bfloat16``.
``SafetensorsFile.read`` maps only the bytes of one tensor, converts them to the requested dtype
(a fresh, owned array) and unmaps them again, so a loader that reads tensors one by one never
holds more than one source tensor besides what it has already converted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
import weakref

import ml_dtypes
import numpy as np

from .errors import ConversionError

#: safetensors dtype names we can read, and their numpy dtypes.
SUPPORTED_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}
#: bytes per element of every dtype in the safetensors spec (for header validation only).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


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
    """Header of one ``.safetensors`` file; tensors are read on demand with :meth:`read`."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.tensors, self.metadata = _parse_header(self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def check_dtype(self, key: str) -> np.dtype:
        dt = self.tensors[key].dtype
        if dt not in SUPPORTED_DTYPES:
            raise ConversionError(
                f"{self.path}: tensor {key!r} has dtype {dt}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_DTYPES)})")
        return SUPPORTED_DTYPES[dt]

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


def _parse_header(path: str):
    def bad(what: str):
        return ConversionError(f"{path}: corrupt or truncated safetensors file: {what}")

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
        raise ConversionError(f"{path}: cannot read: {e}") from e
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
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"tensor {key!r}: {dtype} {tuple(shape)} needs {math.prod(shape) * _ITEMSIZE[dtype]} "
                      f"bytes, but data_offsets span {end - begin}")
        tensors[key] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
    return tensors, metadata
