"""Checkpoints: orbax save/restore of float and quantized FLUX params, with the configs, the report and versions.

    pqjax.save("flux-nvfp4", qparams, flux_config, report)     # report: pqjax.QuantReport (or its to_dict())
    ckpt = pqjax.load("flux-nvfp4")                           # Checkpoint(config, params, quant_config, report, info)
    ckpt = pqjax.load("flux-nvfp4", sharding=mesh_sharding)   # restored straight onto devices, shard by shard

On disk a checkpoint is a directory::

    PATH/pqjax.json     manifest: format + version, pqjax/jax/orbax versions, model config, quantization config,
                        per-site report, and the tree spec (every array's shape/dtype; every QTensor's format,
                        group size, logical shape, axis and dtype; every ActQuant's static fields)
    PATH/arrays/        orbax (StandardCheckpointer, OCDBT) of the arrays: nested dicts like the params, with a
                        QTensor stored as {codes, scales[, global_scale]} and an ActQuant as {global_scale[, smooth]}

Because the manifest holds the whole spec, :func:`load` builds the abstract tree (``jax.ShapeDtypeStruct`` with
the requested shardings) before reading anything, and orbax reads each array straight into its target sharding:
a quantized FLUX.1-dev is restored as packed codes, never as float weights. ``load(path, abstract=True)`` reads
only the manifest.

Atomicity: :func:`save` writes everything into ``PATH.partial-<random>/`` (orbax itself commits ``arrays/`` by a
rename), writes and fsyncs the manifest last, and only then renames the directory to ``PATH``. A save killed at
any point leaves either no ``PATH`` or the previous complete checkpoint (with ``overwrite=True`` there is a
moment when ``PATH`` is absent and the old checkpoint sits in ``PATH.old-<random>``); ``load`` never accepts a
directory without a complete manifest. Stale ``.partial-*`` directories are safe to delete.
Single-process only: multi-host saving would have to gate the manifest and renames on process 0.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import uuid
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.config import QuantConfig, Rule
from pqjax.formats import QTensor
from pqjax.models.flux import FluxConfig, param_layout
from pqjax.formats import ActQuant

__all__ = ["save", "load", "Checkpoint", "CheckpointError", "is_checkpoint", "load_model", "validate_params",
           "report_from_dict", "FORMAT", "FORMAT_VERSION", "MANIFEST"]

FORMAT = "pqjax-checkpoint"
FORMAT_VERSION = 1          # bump when the on-disk layout changes; load refuses newer versions
MANIFEST = "pqjax.json"
ARRAYS = "arrays"

Sharding = Union[jax.sharding.Sharding, Callable[[str, tuple, Any], jax.sharding.Sharding], None]


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read (missing, incomplete, another model or format, newer version)."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What :func:`load` returns.

    ``params``: the float or quantized params pytree (``jax.ShapeDtypeStruct`` leaves with ``abstract=True``).
    ``quant_config``: the :class:`pqjax.QuantConfig` it was quantized with (``None`` for float checkpoints).
    ``report``: the :class:`pqjax.QuantReport` (``None`` if none was saved). ``info``: the manifest's other fields
    (versions, creation time, formats, bytes, ...).
    """

    config: FluxConfig
    params: Any
    quant_config: QuantConfig | None
    report: Any
    info: dict

    @property
    def formats(self) -> tuple[str, ...]:
        """Quantization formats of the QTensors inside (empty for a float checkpoint)."""
        return tuple(self.info.get("formats", ()))

    @property
    def quantized(self) -> bool:
        return bool(self.formats)

    @property
    def kind(self) -> str:
        """``"float"`` or the quantization format (``"nvfp4"``, ``"int4"``, ``"int3"``)."""
        return "+".join(self.formats) if self.formats else "float"


# ---------------------------------------------------------------------------------------------- tree encoding

def _dtype_name(a) -> str:
    return jnp.dtype(a.dtype).name


def _array_spec(a) -> dict:
    return {"kind": "array", "shape": [int(d) for d in a.shape], "dtype": _dtype_name(a)}


def _as_array(a, where: str):
    if isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return a
    if isinstance(a, (bool, int, float, np.generic)):
        return np.asarray(a)
    raise CheckpointError(f"cannot save {where}: a {type(a).__name__} (expected arrays, QTensors and ActQuants "
                          "in nested dicts)")


def _encode(tree, where: str = ""):
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
            arrays[k], spec[k] = _encode(v, f"{where}.{k}" if where else k)
        return arrays, {"kind": "dict", "children": spec}
    a = _as_array(tree, where or "params")
    return a, _array_spec(a)


def _abstract(spec: dict, sharding_for: Callable[[str, tuple, Any], Any], dtype, where: str = ""):
    """spec -> the orbax target tree (ShapeDtypeStruct with sharding), and whether float leaves are cast."""
    kind = spec["kind"]
    if kind == "dict":
        return {k: _abstract(v, sharding_for, dtype, f"{where}.{k}" if where else k)
                for k, v in spec["children"].items()}
    if kind in ("qtensor", "act_quant"):  # packed storage and scales are never cast
        return {k: _leaf(v, sharding_for, None, f"{where}.{k}") for k, v in spec["arrays"].items()}
    return _leaf(spec, sharding_for, dtype, where)


def _leaf(spec: dict, sharding_for, dtype, where: str):
    shape, dt = tuple(spec["shape"]), jnp.dtype(spec["dtype"])
    if dtype is not None and jnp.issubdtype(dt, jnp.floating):
        dt = jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(shape, dt, sharding=sharding_for(where, shape, dt))


def _decode(spec: dict, arrays):
    kind = spec["kind"]
    if kind == "dict":
        return {k: _decode(v, arrays[k]) for k, v in spec["children"].items()}
    if kind == "qtensor":
        return QTensor(arrays["codes"], arrays["scales"], arrays.get("global_scale"), fmt=spec["fmt"],
                       group_size=int(spec["group_size"]), shape=tuple(spec["shape"]), axis=int(spec["axis"]),
                       dtype=spec["dtype"])
    if kind == "act_quant":
        return ActQuant(global_scale=arrays["global_scale"], smooth=arrays.get("smooth"),
                        hadamard=bool(spec["hadamard"]))
    return arrays


def _spec_formats(spec: dict) -> set[str]:
    if spec["kind"] == "qtensor":
        return {spec["fmt"]}
    if spec["kind"] == "dict":
        return set().union(*(_spec_formats(v) for v in spec["children"].values())) if spec["children"] else set()
    return set()


def _spec_nbytes(spec: dict) -> int:
    if spec["kind"] == "dict":
        return sum(_spec_nbytes(v) for v in spec["children"].values())
    if spec["kind"] in ("qtensor", "act_quant"):
        return sum(_spec_nbytes(v) for v in spec["arrays"].values())
    return int(np.prod(spec["shape"], dtype=np.int64)) * jnp.dtype(spec["dtype"]).itemsize


# ---------------------------------------------------------------------------------------------- validation

def _logical_shape(node) -> tuple | None:
    if isinstance(node, QTensor):
        return tuple(node.shape)
    if hasattr(node, "shape"):
        return tuple(node.shape)
    return None


def validate_params(config: FluxConfig, params, *, origin: str = "params") -> None:
    """Check that ``params`` are FLUX params of ``config``: every tensor of the layout present with its (logical)
    shape. Extra entries the quantizer adds (``act_quant``, ``perm``) are allowed. Raises :class:`CheckpointError`."""
    layout = param_layout(config)
    missing, wrong = [], []

    def walk(lay, node, path):
        if isinstance(lay, tuple):
            shape = _logical_shape(node)
            if shape is None:
                missing.append(path)
            elif shape != lay:
                wrong.append(f"{path}: {shape} (expected {lay})")
            return
        if not isinstance(node, dict):
            missing.append(path)
            return
        for k, v in lay.items():
            if k not in node:
                missing.append(f"{path}.{k}" if path else k)
            else:
                walk(v, node[k], f"{path}.{k}" if path else k)

    walk(layout, params, "")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[:3]})")
        raise CheckpointError(f"{origin} do not match the model config ({_config_brief(config)}): "
                              + "; ".join(parts))


def _config_brief(c: FluxConfig) -> str:
    return (f"{c.num_layers}+{c.num_single_layers} blocks, {c.num_attention_heads}x{c.attention_head_dim} heads, "
            f"guidance_embeds={c.guidance_embeds}")


def _config_diff(a: FluxConfig, b: FluxConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}={da[k]!r} vs {db[k]!r}" for k in da if da[k] != db.get(k))


# ---------------------------------------------------------------------------------------------- report

def report_from_dict(d: dict | None):
    """``QuantReport.to_dict()`` -> :class:`pqjax.QuantReport` (``None`` stays ``None``)."""
    if d is None:
        return None
    from pqjax.report import QuantReport, SiteReport

    return QuantReport(config=QuantConfig.from_dict(d["config"]),
                       sites=[SiteReport(**s) for s in d.get("sites", [])],
                       modes=dict(d.get("modes", {})), skipped=dict(d.get("skipped", {})),
                       unused_rules=[Rule(*r) for r in d.get("unused_rules", [])],
                       seconds=dict(d.get("seconds", {})),
                       perms={k: np.asarray(v, np.int32) for k, v in d.get("perms", {}).items()})


def _report_dict(report) -> dict | None:
    if report is None:
        return None
    if isinstance(report, dict):
        return json.loads(json.dumps(report))  # must be JSON-able; copy
    if hasattr(report, "to_dict"):
        return report.to_dict()
    raise CheckpointError(f"report must be a pqjax.QuantReport or its to_dict(), got {type(report).__name__}")


# ---------------------------------------------------------------------------------------------- save

def _versions() -> dict:
    import orbax.checkpoint as ocp

    from pqjax import __version__
    return {"pqjax": __version__, "jax": jax.__version__, "orbax": getattr(ocp, "__version__", "?")}


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def save(path, params, config: FluxConfig, report=None, *, quant_config: QuantConfig | None = None,
         overwrite: bool = False) -> str:
    """Save float or quantized ``params`` of a FLUX model ``config`` as an orbax checkpoint directory ``path``.

    ``report``: the :class:`pqjax.QuantReport` of ``pqjax.quantize`` (or its ``to_dict()``); its config is the
    quantization config unless ``quant_config`` is given. A quantized tree must agree with the quantization
    config's format. ``overwrite``: replace an existing checkpoint at ``path`` (else :class:`CheckpointError`).
    Atomic (see the module docstring). Returns the absolute path.
    """
    if not isinstance(config, FluxConfig):
        raise CheckpointError(f"config must be a pqjax.FluxConfig (the model config), got {type(config).__name__}")
    path = os.path.abspath(os.fspath(path))
    report_d = _report_dict(report)
    if quant_config is None and report_d is not None and "config" in report_d:
        quant_config = QuantConfig.from_dict(report_d["config"])
    if quant_config is not None and not isinstance(quant_config, QuantConfig):
        raise CheckpointError(f"quant_config must be a pqjax.QuantConfig, got {type(quant_config).__name__}")
    validate_params(config, params)
    arrays, spec = _encode(params)
    fmts = sorted(_spec_formats(spec))
    if quant_config is not None and fmts and fmts != [quant_config.format]:
        raise CheckpointError(f"the params hold {fmts} QTensors but the quantization config says "
                              f"{quant_config.format!r}")
    if quant_config is not None and not fmts:
        raise CheckpointError("a quantization config/report was given but the params hold no quantized tensors")
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    if os.path.exists(path) and not is_checkpoint(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"{path} exists and is not a pqjax checkpoint; refusing to overwrite it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "flux",
        "model_config": config.to_dict(),
        "formats": fmts,
        "nbytes": _spec_nbytes(spec),
        "quant_config": None if quant_config is None else quant_config.to_dict(),
        "report": report_d,
        "tree": spec,
        "complete": True,
    }
    tmp = f"{path}.partial-{uuid.uuid4().hex[:12]}"
    os.makedirs(tmp)
    try:
        ck = _checkpointer()
        ck.save(os.path.join(tmp, ARRAYS), arrays)
        ck.wait_until_finished()
        _write_manifest(tmp, manifest)
        _fsync_dir(tmp)
        _commit(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: str, path: str, overwrite: bool) -> None:
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load

def is_checkpoint(path) -> bool:
    """Whether ``path`` is a directory holding a pqjax checkpoint manifest (complete or not checked here)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def _read_manifest(path: str) -> dict:
    if not os.path.exists(path):
        partial = _partials(path)
        hint = (f" (found the incomplete save {os.path.basename(partial[0])}: it was interrupted; delete it and "
                "save again)") if partial else ""
        raise CheckpointError(f"{path}: no such checkpoint{hint}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a pqjax checkpoint (a checkpoint is a directory made by pqjax.save / "
                              "pqjax convert / pqjax quantize)")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{path}: not a pqjax checkpoint or an incomplete one (no {MANIFEST})")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint manifest {MANIFEST}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {MANIFEST} is not a pqjax checkpoint manifest")
    ver = m.get("format_version")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        wrote = m.get("versions", {}).get("pqjax", "?")
        from pqjax import __version__
        raise CheckpointError(f"{path}: written by pqjax {wrote} in checkpoint format version {ver}; this pqjax "
                              f"{__version__} reads versions <= {FORMAT_VERSION}: upgrade pqjax")
    if m.get("complete") is not True or "tree" not in m or "model_config" not in m:
        raise CheckpointError(f"{path}: incomplete checkpoint (manifest lacks its final fields)")
    if not os.path.isdir(os.path.join(path, ARRAYS)):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {ARRAYS}/ directory)")
    return m


def _partials(path: str) -> list[str]:
    parent, base = os.path.split(os.path.abspath(path))
    try:
        return sorted(os.path.join(parent, n) for n in os.listdir(parent or ".") if n.startswith(base + ".partial-"))
    except OSError:
        return []


def _sharding_fn(sharding: Sharding):
    if sharding is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda where, shape, dtype: default
    if isinstance(sharding, jax.sharding.Sharding):
        return lambda where, shape, dtype: sharding
    if callable(sharding):
        return sharding
    raise CheckpointError(f"sharding must be a jax.sharding.Sharding or a callable (path, shape, dtype) -> "
                          f"Sharding, got {type(sharding).__name__}")


def load(path, *, sharding: Sharding = None, dtype=None, abstract: bool = False,
         expect_config: FluxConfig | None = None, expect_format: str | None = None) -> Checkpoint:
    """Restore a checkpoint written by :func:`save` -> :class:`Checkpoint`.

    ``sharding``: where the arrays go: a ``jax.sharding.Sharding`` for every array, or a callable
    ``(path, shape, dtype) -> Sharding`` (``path`` like ``"transformer_blocks.0.attn.to_q.kernel.codes"``);
    default: the first device. Orbax reads each array directly into its sharding.
    ``dtype``: cast the float (16/32-bit) tensors on restore (packed codes, scales and activation scales are never
    cast). ``abstract``: read only the manifest; params leaves are ``jax.ShapeDtypeStruct`` (with shardings).
    ``expect_config`` / ``expect_format`` (``"float"`` or a format name): raise :class:`CheckpointError` if the
    checkpoint holds another model or format. Also raises for a missing, incomplete, corrupt or newer checkpoint.
    """
    path = os.path.abspath(os.fspath(path))
    m = _read_manifest(path)
    try:
        config = FluxConfig.from_dict(m["model_config"])
        quant_config = None if m.get("quant_config") is None else QuantConfig.from_dict(m["quant_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: invalid config in {MANIFEST}: {e}") from None
    if expect_config is not None and config != expect_config:
        raise CheckpointError(f"{path}: checkpoint of another model ({_config_diff(config, expect_config)})")
    fmts = sorted(_spec_formats(m["tree"]))
    kind = "+".join(fmts) if fmts else "float"
    if expect_format is not None and kind != expect_format:
        raise CheckpointError(f"{path}: checkpoint is {kind}, expected {expect_format}")
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise CheckpointError(f"dtype must be a floating dtype, got {dtype}")
    target = _abstract(m["tree"], _sharding_fn(sharding), dtype)
    if abstract:
        arrays = target
    else:
        arrays = _restore(path, target)
    params = _decode(m["tree"], arrays)
    info = {k: v for k, v in m.items() if k not in ("tree", "model_config", "quant_config", "report")}
    info["path"] = path
    try:
        report = report_from_dict(m.get("report"))
    except (TypeError, ValueError, KeyError):
        report = m.get("report")  # an unreadable report is not worth refusing the weights for
    return Checkpoint(config=config, params=params, quant_config=quant_config, report=report, info=info)


def _restore(path: str, target):
    ck = _checkpointer()
    adir = os.path.join(path, ARRAYS)
    try:
        meta = ck.metadata(adir)
        stored = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a broken directory
        raise CheckpointError(f"{path}: incomplete or corrupt checkpoint arrays ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if stored is not None:
        _check_stored(path, target, stored)
    try:
        return ck.restore(adir, target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot restore the arrays ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _check_stored(path: str, target, stored) -> None:
    """The orbax metadata must describe exactly the arrays of the manifest's spec."""
    flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    try:
        flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
            stored, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]}
    except Exception:  # noqa: BLE001
        return
    if set(flat_t) != set(flat_s):
        extra, missing = sorted(set(flat_s) - set(flat_t)), sorted(set(flat_t) - set(flat_s))
        raise CheckpointError(f"{path}: corrupt checkpoint: arrays/ and {MANIFEST} disagree "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in flat_t.items():
        s = flat_s[k]
        if tuple(getattr(s, "shape", t.shape)) != tuple(t.shape):
            raise CheckpointError(f"{path}: corrupt checkpoint: {k} is {tuple(s.shape)} in arrays/ but "
                                  f"{tuple(t.shape)} in {MANIFEST}")


# ---------------------------------------------------------------------------------------------- any model

def load_model(path, *, dtype=None, sharding: Sharding = None, expect_config: FluxConfig | None = None
               ) -> Checkpoint:
    """Load a FLUX model from whatever ``path`` is: a pqjax checkpoint directory, a quantized safetensors file
    written by :func:`pqjax.export_safetensors.save_safetensors`, or any layout ``converters.load_flux`` reads
    (float; ``dtype`` default bfloat16 there; ``sharding`` applies to pqjax checkpoints only). Always returns a
    :class:`Checkpoint`."""
    p = os.fspath(path)
    if os.path.isdir(p) and (is_checkpoint(p) or os.path.isdir(os.path.join(p, ARRAYS))):
        return load(p, dtype=dtype, sharding=sharding, expect_config=expect_config)
    if not os.path.exists(p):
        if _partials(p):
            return load(p)  # raises with the "interrupted save" hint
        raise CheckpointError(f"{p}: no such file or directory")
    if os.path.isfile(p) and p.endswith(".safetensors"):
        from pqjax import export_safetensors as xs
        if xs.is_pqjax_safetensors(p):
            ck = xs.load_safetensors(p, dtype=dtype)
            if expect_config is not None and ck.config != expect_config:
                raise CheckpointError(f"{p}: checkpoint of another model ({_config_diff(ck.config, expect_config)})")
            return ck
    import converters
    config, params = converters.load_flux(p, dtype=jnp.bfloat16 if dtype is None else dtype)
    if expect_config is not None and config != expect_config:
        raise CheckpointError(f"{p}: weights of another model ({_config_diff(config, expect_config)})")
    return Checkpoint(config=config, params=params, quant_config=None, report=None,
                      info={"formats": [], "path": os.path.abspath(p), "source": "converters.load_flux"})
