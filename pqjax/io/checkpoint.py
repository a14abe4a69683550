"""pqjax checkpoints: orbax save/restore of float and quantized FLUX params, with the configs, the report, versions.

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

Atomicity (:mod:`pqjax.io.atomic`): :func:`save` writes everything into ``PATH.partial-<random>/`` (orbax itself
commits ``arrays/`` by a rename), writes and fsyncs the manifest last, and only then renames the directory to
``PATH``. A save killed at any point leaves either no ``PATH`` or the previous complete checkpoint; ``load`` never
accepts a directory without a complete manifest. Stale ``.partial-*`` directories are safe to delete.
Single-process only: multi-host saving would have to gate the manifest and renames on process 0.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from pqjax.config import QuantConfig
from pqjax.io.atomic import atomic_write, partials
from pqjax.io.errors import CheckpointError
from pqjax.io.tree import abstract_tree, decode_tree, encode_tree, spec_formats, spec_nbytes
from pqjax.io.validate import config_diff, report_and_config, validate_params
from pqjax.models.flux import FluxConfig
from pqjax.report import QuantReport

__all__ = ["save", "load", "Checkpoint", "is_checkpoint", "FORMAT", "FORMAT_VERSION", "MANIFEST"]

FORMAT = "pqjax-checkpoint"
FORMAT_VERSION = 1          # bump when the on-disk layout changes; load refuses newer versions
MANIFEST = "pqjax.json"
ARRAYS = "arrays"

Sharding = Union[jax.sharding.Sharding, Callable[[str, tuple, Any], jax.sharding.Sharding], None]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What every loader returns (:func:`load`, :func:`pqjax.io.load_safetensors`, :func:`pqjax.load_model`).

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


# ---------------------------------------------------------------------------------------------- save

def _versions() -> dict:
    import orbax.checkpoint as ocp

    from pqjax.version import __version__
    return {"pqjax": __version__, "jax": jax.__version__, "orbax": getattr(ocp, "__version__", "?")}


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
    report_d, quant_config = report_and_config(report, quant_config)
    validate_params(config, params)
    arrays, spec = encode_tree(params)
    fmts = sorted(spec_formats(spec))
    if quant_config is not None and fmts and fmts != [quant_config.format]:
        raise CheckpointError(f"the params hold {fmts} QTensors but the quantization config says "
                              f"{quant_config.format!r}")
    if quant_config is not None and not fmts:
        raise CheckpointError("a quantization config/report was given but the params hold no quantized tensors")
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    if os.path.exists(path) and not is_checkpoint(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"{path} exists and is not a pqjax checkpoint; refusing to overwrite it")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "flux",
        "model_config": config.to_dict(),
        "formats": fmts,
        "nbytes": spec_nbytes(spec),
        "quant_config": None if quant_config is None else quant_config.to_dict(),
        "report": report_d,
        "tree": spec,
        "complete": True,
    }
    with atomic_write(path, directory=True, overwrite=overwrite) as tmp:
        ck = _checkpointer()
        ck.save(os.path.join(tmp, ARRAYS), arrays)
        ck.wait_until_finished()
        _write_manifest(tmp, manifest)  # last: a directory without a complete manifest is never loaded
    return path


def _write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- load

def is_checkpoint(path) -> bool:
    """Whether ``path`` is a directory holding a pqjax checkpoint manifest (complete or not checked here)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def _read_manifest(path: str) -> dict:
    if not os.path.exists(path):
        partial = partials(path)
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
        from pqjax.version import __version__
        raise CheckpointError(f"{path}: written by pqjax {wrote} in checkpoint format version {ver}; this pqjax "
                              f"{__version__} reads versions <= {FORMAT_VERSION}: upgrade pqjax")
    if m.get("complete") is not True or "tree" not in m or "model_config" not in m:
        raise CheckpointError(f"{path}: incomplete checkpoint (manifest lacks its final fields)")
    if not os.path.isdir(os.path.join(path, ARRAYS)):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {ARRAYS}/ directory)")
    return m


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
        raise CheckpointError(f"{path}: checkpoint of another model ({config_diff(config, expect_config)})")
    fmts = sorted(spec_formats(m["tree"]))
    kind = "+".join(fmts) if fmts else "float"
    if expect_format is not None and kind != expect_format:
        raise CheckpointError(f"{path}: checkpoint is {kind}, expected {expect_format}")
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise CheckpointError(f"dtype must be a floating dtype, got {dtype}")
    target = abstract_tree(m["tree"], _sharding_fn(sharding), dtype)
    if abstract:
        arrays = target
    else:
        arrays = _restore(path, target)
    params = decode_tree(m["tree"], arrays)
    info = {k: v for k, v in m.items() if k not in ("tree", "model_config", "quant_config", "report")}
    info["path"] = path
    return Checkpoint(config=config, params=params, quant_config=quant_config,
                      report=QuantReport.parse(m.get("report")), info=info)


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
