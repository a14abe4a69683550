"""Checks that what a file holds is the FLUX model it claims to be (shapes against the config's layout)."""
from __future__ import annotations

from pqjax.config import QuantConfig
from pqjax.formats import QTensor
from pqjax.io.errors import CheckpointError
from pqjax.models.flux import FluxConfig, param_layout
from pqjax.report import QuantReport

__all__ = ["validate_params", "report_and_config", "config_diff", "config_brief"]


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
        raise CheckpointError(f"{origin} do not match the model config ({config_brief(config)}): "
                              + "; ".join(parts))


def report_and_config(report, quant_config: QuantConfig | None) -> tuple[dict | None, QuantConfig | None]:
    """What a saved model records of its quantization: the report as a dict (a :class:`QuantReport` or its
    ``to_dict()``) and the quantization config (``quant_config``, else the report's)."""
    try:
        report_d = QuantReport.as_dict(report)
    except TypeError as e:
        raise CheckpointError(str(e)) from None
    if quant_config is None and report_d is not None and "config" in report_d:
        quant_config = QuantConfig.from_dict(report_d["config"])
    if quant_config is not None and not isinstance(quant_config, QuantConfig):
        raise CheckpointError(f"quant_config must be a pqjax.QuantConfig, got {type(quant_config).__name__}")
    return report_d, quant_config


def config_brief(c: FluxConfig) -> str:
    return (f"{c.num_layers}+{c.num_single_layers} blocks, {c.num_attention_heads}x{c.attention_head_dim} heads, "
            f"guidance_embeds={c.guidance_embeds}")


def config_diff(a: FluxConfig, b: FluxConfig) -> str:
    """``"field=a vs b, ..."`` for the fields where two model configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}={da[k]!r} vs {db[k]!r}" for k in da if da[k] != db.get(k))
