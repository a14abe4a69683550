"""diffusers layout: model folders (config.json + safetensors, sharded or not) and pipeline folders.

diffusers' state-dict names are our params' names, so the plan is the identity; only the files
have to be found (and an index's shards checked) here.
"""
from __future__ import annotations

import json
import os

from pqjax.io.safetensors import SafetensorsFile
from pqjax.models.flux import FluxConfig

from .core import Spec, infer_config, make_config, state_dict_layout
from .errors import ConversionError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
EXPECTED_CLASS = "FluxTransformer2DModel"


def open_safetensors(path: str) -> SafetensorsFile:
    """The header of one safetensors file; a bad file raises :class:`ConversionError` naming it."""
    return SafetensorsFile(path, error=ConversionError)


def plan(config: FluxConfig) -> list[Spec]:
    return [Spec(k, (k,)) for k in state_dict_layout(config)]


def is_diffusers_keys(keys) -> bool:
    return "x_embedder.weight" in keys or any(k.startswith("transformer_blocks.") for k in keys)


def model_folder(path: str) -> str:
    """The folder holding the transformer's config.json (a pipeline folder's ``transformer/``)."""
    if os.path.isfile(os.path.join(path, "model_index.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        sub = os.path.join(path, "transformer")
        if not os.path.isdir(sub):
            raise ConversionError(f"{path}: diffusers pipeline folder (model_index.json) has no 'transformer' subfolder")
        return sub
    return path


def read_config(folder: str, overrides) -> FluxConfig:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{folder}: not a diffusers model folder: no config.json "
                              "(expected config.json + diffusion_pytorch_model.safetensors[.index.json], "
                              "or a pipeline folder with model_index.json + transformer/)")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{cfg_path}: cannot read config: {e}") from e
    if not isinstance(d, dict):
        raise ConversionError(f"{cfg_path}: config is not a JSON object")
    cls = d.get("_class_name")
    if cls is not None and cls != EXPECTED_CLASS:
        raise ConversionError(f"{cfg_path}: _class_name is {cls!r}, expected {EXPECTED_CLASS!r}")
    return make_config(d, overrides, cfg_path)


def open_weights(folder: str) -> dict[str, tuple[SafetensorsFile, str]]:
    """checkpoint key -> (file, key) over the folder's (possibly sharded) safetensors weights."""
    index = os.path.join(folder, INDEX_NAME)
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(index):
        return open_index(folder, index)
    if os.path.isfile(single):
        f = open_safetensors(single)
        return {k: (f, k) for k in f.keys()}
    bins = [n for n in sorted(os.listdir(folder)) if n.endswith(".bin")]
    hint = f" (found {bins}: only .safetensors weights are supported)" if bins else ""
    raise ConversionError(f"{folder}: no weights: expected {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def open_index(folder: str, index: str) -> dict[str, tuple[SafetensorsFile, str]]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise ConversionError(f"{index}: not a valid safetensors index (expected a JSON object with a "
                              f"'weight_map' of tensor name -> shard file): {e!r}") from None
    shards: dict[str, SafetensorsFile] = {}
    for name in sorted(set(weight_map.values())):
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            raise ConversionError(f"{index}: shard {name!r} named in the index does not exist in {folder}")
        shards[name] = open_safetensors(p)
    out: dict[str, tuple[SafetensorsFile, str]] = {}
    for key, name in weight_map.items():
        if key not in shards[name]:
            raise ConversionError(f"{index}: the index puts tensor {key!r} in shard {name!r}, "
                                  f"but {shards[name].path} has no such tensor")
        out[key] = (shards[name], key)
    for name, f in shards.items():
        extra = [k for k in f.keys() if k not in weight_map]
        if extra:
            raise ConversionError(f"{f.path}: tensors not listed in {index}: {extra[:20]}")
    return out


def infer_from_shapes(shapes, overrides, origin: str) -> FluxConfig:
    """Config of a lone diffusers-named safetensors file (no config.json beside it)."""
    return infer_config(
        shapes, {"img_in": "x_embedder.weight", "txt_in": "context_embedder.weight",
                 "vec_in": "time_text_embed.text_embedder.linear_1.weight", "final": "proj_out.weight"},
        double_prefix="transformer_blocks.", single_prefix="single_transformer_blocks.",
        head_scale=("transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight"),
        guidance_prefix="time_text_embed.guidance_embedder.", overrides=overrides, origin=origin)
