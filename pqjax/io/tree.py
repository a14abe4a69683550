"""Params trees <-> (plain arrays, a JSON spec): how a checkpoint stores QTensors and ActQuants.

:func:`encode_tree` splits a params tree into nested dicts of arrays (a QTensor as ``{codes, scales[,
global_scale]}``, an ActQuant as ``{global_scale[, smooth]}``) and a JSON-able spec of every node (shapes,
dtypes, every QTensor's format / group size / logical shape / axis / dtype, every ActQuant's static fields);
:func:`decode_tree` inverts it. :func:`abstract_tree` builds the ``jax.ShapeDtypeStruct`` target of a restore from
the spec alone, so arrays can be read straight into their shardings.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.formats import ActQuant, QTensor
from pqjax.io.errors import CheckpointError

__all__ = ["encode_tree", "decode_tree", "abstract_tree", "spec_formats", "spec_nbytes"]


def _array_spec(a) -> dict:
    return {"kind": "array", "shape": [int(d) for d in a.shape], "dtype": jnp.dtype(a.dtype).name}


def _as_array(a, where: str):
    if isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return a
    if isinstance(a, (bool, int, float, np.generic)):
        return np.asarray(a)
    raise CheckpointError(f"cannot save {where}: a {type(a).__name__} (expected arrays, QTensors and ActQuants "
                          "in nested dicts)")


def encode_tree(tree, where: str = ""):
    """params -> (arrays: nested dicts of arrays, spec: JSON-able description of every node)."""
    if isinstance(tree, QTensor):
        arrays = {k: _as_array(getattr(tree, k), f"{where}.{k}") for k in ("codes", "scales", "global_scale")
                  if getattr(tree, k) is not None}
        if len(tree.codes.shape) != len(tree.shape):
            raise CheckpointError(f"{where}: stacked QTensors (batch dims {tree.batch_shape}) are not supported")
        return arrays, {"kind": "qtensor", "fmt": tree.fmt, "group_size": int(tree.group_size),
                        "shape": [int(d) for d in tree.shape], "axis": int(tree.axis), "dtype": tree.dtype,
                        "arrays": {k: _array_spec(v) for k, v in arrays.items()}}
    if isinstance(tree, ActQuant):
        arrays = {k: _as_array(getattr(tree, k), f"{where}.{k}") for k in ("global_scale", "smooth")
                  if getattr(tree, k) is not None}
        return arrays, {"kind": "act_quant", "hadamard": bool(tree.hadamard),
                        "arrays": {k: _array_spec(v) for k, v in arrays.items()}}
    if isinstance(tree, dict):
        arrays, spec = {}, {}
        for k, v in tree.items():
            if not isinstance(k, str):
                raise CheckpointError(f"cannot save {where or 'params'}: dict key {k!r} is not a string")
            arrays[k], spec[k] = encode_tree(v, f"{where}.{k}" if where else k)
        return arrays, {"kind": "dict", "children": spec}
    a = _as_array(tree, where or "params")
    return a, _array_spec(a)


def abstract_tree(spec: dict, sharding_for: Callable[[str, tuple, Any], Any], dtype, where: str = ""):
    """spec -> the orbax target tree of ``jax.ShapeDtypeStruct`` (with ``sharding_for(path, shape, dtype)``);
    float leaves are cast to ``dtype`` when given, packed codes and scales never."""
    kind = spec["kind"]
    if kind == "dict":
        return {k: abstract_tree(v, sharding_for, dtype, f"{where}.{k}" if where else k)
                for k, v in spec["children"].items()}
    if kind in ("qtensor", "act_quant"):
        return {k: _leaf(v, sharding_for, None, f"{where}.{k}") for k, v in spec["arrays"].items()}
    return _leaf(spec, sharding_for, dtype, where)


def _leaf(spec: dict, sharding_for, dtype, where: str):
    shape, dt = tuple(spec["shape"]), jnp.dtype(spec["dtype"])
    if dtype is not None and jnp.issubdtype(dt, jnp.floating):
        dt = jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(shape, dt, sharding=sharding_for(where, shape, dt))


def decode_tree(spec: dict, arrays):
    """Inverse of :func:`encode_tree` (``arrays`` may be abstract)."""
    kind = spec["kind"]
    if kind == "dict":
        return {k: decode_tree(v, arrays[k]) for k, v in spec["children"].items()}
    if kind == "qtensor":
        return QTensor(arrays["codes"], arrays["scales"], arrays.get("global_scale"), fmt=spec["fmt"],
                       group_size=int(spec["group_size"]), shape=tuple(spec["shape"]), axis=int(spec["axis"]),
                       dtype=spec["dtype"])
    if kind == "act_quant":
        return ActQuant(global_scale=arrays["global_scale"], smooth=arrays.get("smooth"),
                        hadamard=bool(spec["hadamard"]))
    return arrays


def spec_formats(spec: dict) -> set[str]:
    """Quantization formats of the QTensors a spec describes."""
    if spec["kind"] == "qtensor":
        return {spec["fmt"]}
    if spec["kind"] == "dict":
        return set().union(*(spec_formats(v) for v in spec["children"].values())) if spec["children"] else set()
    return set()


def spec_nbytes(spec: dict) -> int:
    """Stored bytes of every array a spec describes."""
    if spec["kind"] == "dict":
        return sum(spec_nbytes(v) for v in spec["children"].values())
    if spec["kind"] in ("qtensor", "act_quant"):
        return sum(spec_nbytes(v) for v in spec["arrays"].values())
    return int(np.prod(spec["shape"], dtype=np.int64)) * jnp.dtype(spec["dtype"]).itemsize
