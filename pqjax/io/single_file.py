"""Quantized (or float) FLUX params <-> one ``.safetensors`` file, readable without pqjax.

    from pqjax.io import save_safetensors, load_safetensors
    save_safetensors("flux-nvfp4.safetensors", qparams, flux_config, report)
    ckpt = load_safetensors("flux-nvfp4.safetensors")      # pqjax.io.Checkpoint; identical qparams

Tensor names (``M`` = the diffusers module path, e.g. ``transformer_blocks.0.attn.to_q``)
-----------------------------------------------------------------------------------------
Quantized linear (Flax kernel ``W[K, N]`` quantized along K; rows are output channels, like torch's ``weight``):

=============================  ========================  ==================================================
``M.weight_packed``            U8 ``[N, K/2]``           nvfp4 / int4: two codes per byte, element 2i in the LOW
                               U8 ``[N, 3K/8]``          nibble; int3: 8 codes per 3 bytes, code k in bits
                                                          3k..3k+2 of the little-endian 24-bit word. nvfp4 codes
                                                          are e2m1 bit patterns, int codes two's complement.
``M.weight_scale``             F8_E4M3 ``[N, K/16]``     nvfp4 block scales; INT: BF16 (or F16/F32)
                               BF16 ``[N, K/group]``     ``[N, K/group]`` per-group scales
``M.weight_global_scale``      F32 ``[]``                nvfp4 only: ``W ~= e2m1(code) * scale * global``
                                                          (the dequantization multiplier amax / 2688, NOT its
                                                          reciprocal as in some other tools)
``M.input_global_scale``       F32 ``[]``                W4A4 only: static activation scale (nvfp4; 1.0 and
                                                          unused for INT, whose activation scales are dynamic)
``M.input_smooth``             F32 ``[K]``               SmoothQuant only: the activation is multiplied by it
                                                          before it is quantized
``M.bias``                     as stored ``[N]``
=============================  ========================  ==================================================

16-bit tensors keep diffusers' state-dict names and layouts: ``M.weight`` ``[out, in]`` for a linear (the
transposed Flax kernel), ``M.weight`` for an RMSNorm scale, ``M.bias``. PermuQuant's absorbed P1/P3 permutations
are ``M.perm`` (I32 ``[K]``, ``M`` a norm module: the model reads the normalized activation as ``xn[..., perm]``).
A linear is W4A4 when it has ``input_global_scale``, weight-only (W4A16) otherwise.

Metadata (``__metadata__``, all strings): ``format: "pt"``; ``pqjax_version``; ``pqjax_format_version``;
``model_config`` (JSON of :class:`pqjax.FluxConfig`); ``quantization_config`` (JSON: ``quant_method: "pqjax"``,
``format``, ``method``, ``group_size``, ``config`` = the :class:`pqjax.QuantConfig`, and ``layers``: per quantized
module its ``mode`` (w4a4 / w4a16), ``fmt``, ``group_size``, logical ``shape`` ``[K, N]``, ``axis``, ``dtype`` and
``hadamard`` (the activation is block-Hadamard-rotated inside the quantize step; the weight was rotated offline));
``pqjax_report`` (JSON of the per-site report, without the permutation lists). Float params exported this way
have no ``quantization_config`` and form a diffusers-compatible single file.

This is the ``pqjax`` layout of a single file; another tool's layout (e.g. ModelOpt's NVFP4 names) would be a
sibling module with its own save/load pair, recognised by its metadata in :func:`pqjax.load_model`.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from pqjax.config import QuantConfig
from pqjax.formats import ActQuant, QTensor
from pqjax.io.checkpoint import Checkpoint
from pqjax.io.errors import CheckpointError
from pqjax.io.safetensors import SafetensorsFile, save_file
from pqjax.io.validate import report_and_config, validate_params
from pqjax.models.flux import FluxConfig
from pqjax.report import QuantReport

__all__ = ["save_safetensors", "load_safetensors", "is_pqjax_safetensors", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_LINEAR_KEYS = {"kernel", "bias", "act_quant"}
_RESERVED = {"weight", "weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "input_smooth"}


# ---------------------------------------------------------------------------------------------- export

def _np(a) -> np.ndarray:
    return np.asarray(a)


def _flatten(params) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """params -> ({tensor name: array}, {quantized module: layer metadata})."""
    tensors, layers = {}, {}

    def put(name, a):
        if name in tensors:
            raise CheckpointError(f"safetensors export: two tensors named {name!r}")
        tensors[name] = _np(a)

    def walk(node, path):
        if not isinstance(node, dict):
            raise CheckpointError(f"safetensors export: unexpected {type(node).__name__} at {path or 'the root'}")
        if "kernel" in node:
            extra = set(node) - _LINEAR_KEYS
            if extra:
                raise CheckpointError(f"safetensors export: linear {path} has unknown entries {sorted(extra)}")
            k, act = node["kernel"], node.get("act_quant")
            if isinstance(k, QTensor):
                if len(k.codes.shape) != len(k.shape):
                    raise CheckpointError(f"safetensors export: {path}: stacked QTensors are not supported")
                put(f"{path}.weight_packed", k.codes)
                put(f"{path}.weight_scale", k.scales)
                if k.global_scale is not None:
                    put(f"{path}.weight_global_scale", k.global_scale)
                layers[path] = {"mode": "w4a4" if act is not None else "w4a16", "fmt": k.fmt,
                                "group_size": int(k.group_size), "shape": [int(d) for d in k.shape],
                                "axis": int(k.axis), "dtype": k.dtype,
                                "hadamard": bool(act.hadamard) if act is not None else False}
            else:
                if np.ndim(k) != 2:
                    raise CheckpointError(f"safetensors export: {path}.kernel must be 2-d, got shape {np.shape(k)}")
                if act is not None:
                    raise CheckpointError(f"safetensors export: {path} has act_quant but a float kernel")
                put(f"{path}.weight", _np(k).T)
            if "bias" in node:
                put(f"{path}.bias", node["bias"])
            if act is not None:
                if not isinstance(act, ActQuant):
                    raise CheckpointError(f"safetensors export: {path}.act_quant is a {type(act).__name__}")
                put(f"{path}.input_global_scale", act.global_scale)
                if act.smooth is not None:
                    put(f"{path}.input_smooth", act.smooth)
            return
        for key, val in node.items():
            sub = f"{path}.{key}" if path else key
            if isinstance(val, dict):
                walk(val, sub)
            elif isinstance(val, (QTensor, ActQuant)):
                raise CheckpointError(f"safetensors export: {sub}: a {type(val).__name__} outside a linear")
            elif key == "scale":
                put(f"{path}.weight", val)          # RMSNorm: diffusers calls it weight
            elif key in _RESERVED or not path:
                raise CheckpointError(f"safetensors export: cannot name the tensor at {sub}")
            else:
                put(sub, val)                       # perm (int32) and any other plain tensor

    walk(params, "")
    return tensors, layers


def save_safetensors(path, params, config: FluxConfig, report=None, *, quant_config: QuantConfig | None = None,
                     overwrite: bool = True) -> str:
    """Write float or quantized FLUX ``params`` to one safetensors file (names and metadata: module docstring).

    Atomic: written to ``PATH.partial-<random>`` and renamed. Returns the absolute path."""
    from pqjax.version import __version__

    path = os.path.abspath(os.fspath(path))
    validate_params(config, params)
    report_d, quant_config = report_and_config(report, quant_config)
    tensors, layers = _flatten(params)
    fmts = sorted({m["fmt"] for m in layers.values()})
    meta = {"format": "pt", "pqjax_version": __version__, "pqjax_format_version": str(FORMAT_VERSION),
            "model_config": json.dumps(config.to_dict())}
    if layers:
        if len(fmts) != 1:
            raise CheckpointError(f"safetensors export: mixed formats {fmts} are not supported")
        if quant_config is not None and quant_config.format != fmts[0]:
            raise CheckpointError(f"the params hold {fmts[0]} QTensors but the quantization config says "
                                  f"{quant_config.format!r}")
        qc = {"quant_method": "pqjax", "format": fmts[0],
              "method": None if quant_config is None else quant_config.method,
              "group_size": next(iter(layers.values()))["group_size"],
              "config": None if quant_config is None else quant_config.to_dict(), "layers": layers}
        meta["quantization_config"] = json.dumps(qc)
    if report_d is not None:
        meta["pqjax_report"] = json.dumps({k: v for k, v in report_d.items() if k != "perms"})

    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    return save_file(path, tensors, meta, error=CheckpointError)


# ---------------------------------------------------------------------------------------------- import

def _open(path: str) -> SafetensorsFile:
    return SafetensorsFile(path, error=CheckpointError)


def is_pqjax_safetensors(path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_safetensors`."""
    try:
        return "pqjax_format_version" in _open(os.fspath(path)).metadata
    except CheckpointError:
        return False


def _set(tree: dict, module: str, key: str, value) -> None:
    node = tree
    for part in module.split(".") if module else ():
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CheckpointError(f"tensor names clash at {module}")
    if key in node:
        raise CheckpointError(f"two tensors map to {module}.{key}")
    node[key] = value


def load_safetensors(path, *, dtype=None) -> Checkpoint:
    """Read a file written by :func:`save_safetensors` back to the identical params -> :class:`Checkpoint`.

    ``dtype``: cast the 16/32-bit float tensors (not packed codes or scales). Raises :class:`CheckpointError` for
    a file pqjax did not write, a newer format version, or tensors that do not form the declared model."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    f = _open(path)
    meta = f.metadata
    if "pqjax_format_version" not in meta:
        raise CheckpointError(f"{path}: not written by pqjax (no pqjax_format_version metadata); float FLUX "
                              "weights are read with converters.load_flux / `pqjax convert`")
    try:
        ver = int(meta["pqjax_format_version"])
        config = FluxConfig.from_dict(json.loads(meta["model_config"]))
        qc = json.loads(meta["quantization_config"]) if "quantization_config" in meta else None
        report_d = json.loads(meta["pqjax_report"]) if "pqjax_report" in meta else None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid pqjax metadata: {e}") from None
    if ver > FORMAT_VERSION:
        raise CheckpointError(f"{path}: pqjax safetensors format version {ver}; this pqjax reads <= "
                              f"{FORMAT_VERSION}: upgrade pqjax")
    if qc is not None and qc.get("quant_method") != "pqjax":
        raise CheckpointError(f"{path}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'pqjax'")
    layers = {} if qc is None else qc.get("layers", {})
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(jnp.dtype(dtype)))

    params: dict = {}
    groups: dict[str, dict[str, str]] = {}
    for name in f.keys():
        module, _, suffix = name.rpartition(".")
        groups.setdefault(module, {})[suffix] = name
    for module, names in groups.items():
        if module in layers:
            lm = layers[module]
            need = {"weight_packed", "weight_scale"} | ({"weight_global_scale"} if lm["fmt"] == "nvfp4" else set())
            if not need <= set(names):
                raise CheckpointError(f"{path}: quantized linear {module} lacks {sorted(need - set(names))}")
            g = f.read(names["weight_global_scale"]) if "weight_global_scale" in names else None
            q = QTensor(jnp.asarray(f.read(names["weight_packed"])), jnp.asarray(f.read(names["weight_scale"])),
                        None if g is None else jnp.asarray(g), fmt=lm["fmt"], group_size=int(lm["group_size"]),
                        shape=tuple(lm["shape"]), axis=int(lm["axis"]), dtype=lm["dtype"])
            _set(params, module, "kernel", q)
            if "input_global_scale" in names:
                sm = f.read(names["input_smooth"]) if "input_smooth" in names else None
                _set(params, module, "act_quant", ActQuant(
                    global_scale=jnp.asarray(f.read(names["input_global_scale"])),
                    smooth=None if sm is None else jnp.asarray(sm), hadamard=bool(lm.get("hadamard", False))))
            elif lm.get("mode") == "w4a4":
                raise CheckpointError(f"{path}: W4A4 linear {module} lacks input_global_scale")
            rest = set(names) - {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale",
                                 "input_smooth"}
        else:
            rest = set(names)
            if rest & {"weight_packed", "weight_scale", "input_global_scale"}:
                raise CheckpointError(f"{path}: {module} has quantized tensors but no quantization_config entry")
        for suffix in sorted(rest):
            a = f.read(names[suffix])
            if suffix == "weight":
                if a.ndim == 2:
                    _set(params, module, "kernel", jnp.asarray(cast(a.T)))
                else:
                    _set(params, module, "scale", jnp.asarray(cast(a)))
            elif suffix == "bias":
                _set(params, module, "bias", jnp.asarray(cast(a)))
            else:
                _set(params, module, suffix, jnp.asarray(a))
    validate_params(config, params, origin=f"{path}: the tensors")
    quant_config = None
    if qc is not None and qc.get("config") is not None:
        quant_config = QuantConfig.from_dict(qc["config"])
    report = QuantReport.parse(report_d)
    fmts = sorted({m["fmt"] for m in layers.values()})
    info = {"format": "pqjax-safetensors", "format_version": ver, "formats": fmts, "path": path,
            "versions": {"pqjax": meta.get("pqjax_version", "?")}}
    return Checkpoint(config=config, params=params, quant_config=quant_config, report=report, info=info)
