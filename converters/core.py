"""Format-independent half of loading: a plan of source tensors -> validated, converted params.

A *plan* is a list of :class:`Spec`: one source tensor (by its name in the checkpoint) and the
diffusers state-dict keys it fills (several when the source is fused, e.g. BFL's ``qkv``).
:func:`materialize` checks the whole plan against the files' headers first (missing/unexpected
keys, dtypes, shapes) and only then reads the tensors, one at a time, so a bad checkpoint raises
before anything is read and a good one never holds more than one source tensor beyond the params.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from pqjax.io.safetensors import FLOAT_DTYPES, SafetensorsFile
from pqjax.models.flux import FluxConfig, param_layout

from .errors import ConversionError, key_list


@dataclasses.dataclass(frozen=True)
class Spec:
    """Source tensor ``key`` -> diffusers keys ``targets`` (consecutive row blocks, in order).

    ``swap_halves``: the single target is ``concat(src[n/2:], src[:n/2])`` along rows (BFL's
    final_layer.adaLN_modulation stores (shift, scale), diffusers' norm_out.linear (scale, shift))."""
    key: str
    targets: tuple[str, ...]
    swap_halves: bool = False


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]       # path in the params tree
    torch_shape: tuple[int, ...]
    transpose: bool             # torch Linear weight [out, in] -> Flax kernel [in, out]


def state_dict_layout(config: FluxConfig) -> dict[str, Leaf]:
    """diffusers state-dict key -> where it goes in the params tree, and its torch shape."""
    out = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(
        param_layout(config), is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    for kpath, shape in flat:
        names = tuple(k.key for k in kpath)
        module, leaf = ".".join(names[:-1]), names[-1]
        if leaf == "kernel":
            out[module + ".weight"] = Leaf(names, tuple(reversed(shape)), True)
        elif leaf == "scale":
            out[module + ".weight"] = Leaf(names, tuple(shape), False)
        else:
            out[f"{module}.{leaf}"] = Leaf(names, tuple(shape), False)
    return out


def check_overrides(overrides: Mapping[str, Any] | None) -> None:
    known = {f.name for f in dataclasses.fields(FluxConfig)}
    bad = sorted(set(overrides or {}) - known)
    if bad:
        raise ConversionError(f"config_overrides has unknown FluxConfig fields {bad}; known: {sorted(known)}")


def make_config(fields: Mapping[str, Any], overrides: Mapping[str, Any] | None, origin: str) -> FluxConfig:
    check_overrides(overrides)
    known = {f.name for f in dataclasses.fields(FluxConfig)}
    fields = {k: v for k, v in fields.items() if k in known}
    fields.update(overrides or {})
    try:
        return FluxConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{origin}: invalid FLUX config {fields}: {e}") from e


def infer_config(shapes: Mapping[str, tuple[int, ...]], names: Mapping[str, str], *, double_prefix: str,
                 single_prefix: str, head_scale: Sequence[str], guidance_prefix: str,
                 overrides: Mapping[str, Any] | None, origin: str) -> FluxConfig:
    """FluxConfig from tensor shapes alone (a single file without config.json).

    ``names`` maps roles ("img_in", "txt_in", "vec_in", "final") to the weight keys of this layout;
    ``head_scale`` are candidate qk-norm scale keys (their length is the head dim)."""
    def count(prefix):
        idx = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
        return max(idx) + 1 if idx else 0

    def shape(role):
        key = names[role]
        if key not in shapes:
            raise ConversionError(f"{origin}: cannot infer the FLUX config: tensor {key!r} is missing")
        return shapes[key]

    d, in_ch = shape("img_in")
    head = next((shapes[k] for k in head_scale if k in shapes), None)
    if head is None:
        raise ConversionError(f"{origin}: cannot infer the head dim: none of {list(head_scale)} is present")
    head_dim = head[0]
    if head_dim <= 0 or d % head_dim:
        raise ConversionError(f"{origin}: inner dim {d} is not a multiple of the qk-norm size {head_dim}")
    out_ch = shape("final")[0]
    fields = dict(
        patch_size=1, in_channels=in_ch, out_channels=None if out_ch == in_ch else out_ch,
        num_layers=count(double_prefix), num_single_layers=count(single_prefix),
        attention_head_dim=head_dim, num_attention_heads=d // head_dim,
        joint_attention_dim=shape("txt_in")[1], pooled_projection_dim=shape("vec_in")[1],
        guidance_embeds=any(k.startswith(guidance_prefix) for k in shapes))
    overrides = dict(overrides or {})
    if "axes_dims_rope" not in overrides:
        if head_dim != 128:
            raise ConversionError(
                f"{origin}: axes_dims_rope is not stored in the weights and has no default for head dim "
                f"{head_dim} (FLUX.1 uses (16, 56, 56) for head dim 128): pass "
                f"config_overrides={{'axes_dims_rope': (...)}} with entries summing to {head_dim}")
        fields["axes_dims_rope"] = (16, 56, 56)
    return make_config(fields, overrides, origin)


def materialize(config: FluxConfig, plan: Sequence[Spec], files: Mapping[str, tuple[SafetensorsFile, str]],
                dtype, origin: str, ignored: Sequence[str] = ()) -> dict:
    """Validate ``plan`` against ``files`` (checkpoint key -> (file, key in that file)), then read.

    ``ignored``: checkpoint keys that are deliberately skipped (not reported as unexpected)."""
    layout = state_dict_layout(config)
    planned = {s.key for s in plan}
    produced = [t for s in plan for t in s.targets]
    assert sorted(produced) == sorted(layout), "plan does not cover the layout exactly"
    missing = [s.key for s in plan if s.key not in files]
    unexpected = [k for k in files if k not in planned and k not in set(ignored)]
    if missing or unexpected:
        msg = [f"{origin}: checkpoint does not match a FluxTransformer2DModel with {_describe(config)}"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {key_list(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {key_list(unexpected)}")
        raise ConversionError("; ".join(msg))

    target_dtype = np.dtype(dtype)
    wrong = []
    for s in plan:
        f, k = files[s.key]
        f.check_dtype(k, FLOAT_DTYPES)
        exp = _source_shape(s, layout)
        got = f.info(k).shape
        if got != exp:
            wrong.append(f"{f.path}: tensor {k!r} has shape {got}, expected {exp}")
    if wrong:
        more = f" (+{len(wrong) - 10} more)" if len(wrong) > 10 else ""
        raise ConversionError(f"shape mismatch for a FluxTransformer2DModel with {_describe(config)} "
                              f"(torch layout, Linear weights [out, in]): " + "; ".join(wrong[:10]) + more)

    params: dict = {}
    for s in plan:
        f, k = files[s.key]
        arr = f.read(k, target_dtype)
        start = 0
        for t in s.targets:
            leaf = layout[t]
            rows = leaf.torch_shape[0]
            piece = arr[start:start + rows]
            start += rows
            if s.swap_halves:
                piece = np.concatenate([piece[rows // 2:], piece[:rows // 2]])
            # an owned, contiguous copy: the source tensor must not stay referenced
            host = np.ascontiguousarray(piece.T) if leaf.transpose else np.array(piece, copy=True)
            # device_put of an owned buffer (zero-copy on CPU); jnp.array would keep its
            # argument alive in a reference cycle until the next garbage collection.
            value = jax.device_put(host)
            value.block_until_ready()  # transfers are async: finish before the next read
            _insert(params, leaf.path, value)
            del piece, host, value
        del arr  # drop the source tensor before reading the next one
    return params


def _source_shape(s: Spec, layout: Mapping[str, Leaf]) -> tuple[int, ...]:
    shapes = [layout[t].torch_shape for t in s.targets]
    return (sum(sh[0] for sh in shapes),) + shapes[0][1:]


def _insert(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _describe(c: FluxConfig) -> str:
    return (f"num_layers={c.num_layers}, num_single_layers={c.num_single_layers}, inner_dim={c.inner_dim} "
            f"({c.num_attention_heads} heads x {c.attention_head_dim}), in_channels={c.in_channels}, "
            f"joint_attention_dim={c.joint_attention_dim}, pooled_projection_dim={c.pooled_projection_dim}, "
            f"guidance_embeds={c.guidance_embeds}")


