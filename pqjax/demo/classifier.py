"""ShapeEval: a small pure-JAX CNN that reads a shapes image back into its attributes.

It predicts the object count (1 or 2) and, for up to two object *slots*, the shape, colour, size and position.
Slots are in a canonical order (see ``canonical_objects``): objects sorted by the position's centre ``(x, y)``, so
left comes before right and top before bottom.  Two-object scenes always sit at opposite positions (left/right or
top/bottom), so the order is well defined; labels and predictions are canonicalized the same way.

Pure functional: ``params`` is a nested dict of arrays and ``apply(params, images) -> dict of logits`` with
``"count"`` [B, 2] and ``"shape"`` / ``"color"`` / ``"size"`` / ``"position"`` [B, 2, n_classes] (slot axis 1).
Images are uint8 (or float in [0, 255]) ``[B, S, S, 3]`` with ``S`` = 32 or 64 (the ``size`` the model was built for).

    params = load("shapeeval.npz")          # the shipped one: pqjax.demo.assets.load_shapeeval()
    evaluate(params, images, scenes)        # {"count": 1.0, "shape": 0.99, ...}
    predict_attributes(params, images)      # [{"count": 1, "objects": [{...}]}, ...]

Training (``examples/train_shapeeval.py``; code in ``examples/demo_training.py``) is not part of the package.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from pqjax.demo.data import COLORS, POSITIONS, SHAPES, SIZES, attributes

MAX_SLOTS = 2
CLASSES = {"shape": tuple(SHAPES), "color": tuple(COLORS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
SLOT_ATTRS = tuple(CLASSES)
COUNTS = (1, 2)
CHANNELS = (32, 64, 64)
HIDDEN = 256
FEATURE_GRID = 8  # the last conv feature map is FEATURE_GRID x FEATURE_GRID


# --- labels ------------------------------------------------------------------------------------------------------

def _slot_key(obj: dict):
    fx, fy = POSITIONS[obj["position"]]
    return (fx, fy)


def canonical_objects(objects: list[dict]) -> list[dict]:
    """``objects`` (attribute dicts) in canonical slot order: by position centre x, then y (left < right,
    top < bottom). Stable, so objects at the same position keep their order."""
    return sorted((dict(o) for o in objects), key=_slot_key)


def canonical_attributes(attrs: dict) -> dict:
    return {"count": int(attrs["count"]), "objects": canonical_objects(attrs["objects"])}


def attributes_to_labels(attrs_list) -> dict:
    """Attribute dicts (as from ``data.attributes``) -> int32 label arrays: ``"count"`` [B] (index into COUNTS) and
    per-slot ``"shape"`` / ``"color"`` / ``"size"`` / ``"position"`` [B, MAX_SLOTS] (-1 where the slot is empty)."""
    n = len(attrs_list)
    labels = {"count": np.zeros((n,), np.int32), **{k: np.full((n, MAX_SLOTS), -1, np.int32) for k in SLOT_ATTRS}}
    for i, attrs in enumerate(attrs_list):
        objs = canonical_objects(attrs["objects"])
        if not 1 <= len(objs) <= MAX_SLOTS or int(attrs["count"]) != len(objs):
            raise ValueError(f"unsupported attributes {attrs!r}")
        labels["count"][i] = COUNTS.index(len(objs))
        for s, obj in enumerate(objs):
            for k in SLOT_ATTRS:
                labels[k][i, s] = CLASSES[k].index(obj[k])
    return labels


def labels_to_attributes(labels: dict) -> list[dict]:
    """Inverse of ``attributes_to_labels`` (the objects come back in canonical slot order)."""
    counts = np.asarray(labels["count"])
    out = []
    for i in range(len(counts)):
        n = COUNTS[int(counts[i])]
        objs = [{k: CLASSES[k][int(labels[k][i, s])] for k in SLOT_ATTRS} for s in range(n)]
        out.append({"count": n, "objects": canonical_objects(objs)})
    return out


def scenes_to_labels(scenes) -> dict:
    return attributes_to_labels([attributes(s) for s in scenes])


# --- model -------------------------------------------------------------------------------------------------------

def first_stride(size: int) -> int:
    """The first convolution's stride for ``size`` x ``size`` images (32 or 64)."""
    if size not in (32, 64):
        raise ValueError(f"image size must be 32 or 64, got {size}")
    return size // 32


def _conv(x, p, stride):
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + p["b"])


def apply(params: dict, images) -> dict:
    """Logits: ``"count"`` [B, 2]; ``"shape"``/``"color"``/``"size"``/``"position"`` [B, MAX_SLOTS, n_classes]."""
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    size = x.shape[1]
    strides = (first_stride(size), 2, 2)
    for i, stride in enumerate(strides):
        x = _conv(x, params[f"conv{i}"], stride)
    x = x.reshape(x.shape[0], -1)
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    out = {"count": h @ params["head_count"]["w"] + params["head_count"]["b"]}
    for k, v in CLASSES.items():
        p = params[f"head_{k}"]
        out[k] = (h @ p["w"] + p["b"]).reshape(h.shape[0], MAX_SLOTS, len(v))
    return out


# --- inference / evaluation --------------------------------------------------------------------------------------

@jax.jit
def _predict_labels(params, images):
    logits = apply(params, images)
    return {k: jnp.argmax(v, axis=-1).astype(jnp.int32) for k, v in logits.items()}


def predict_labels(params, images, chunk: int = 512) -> dict:
    """Raw argmax labels per head (slots as the network emits them; both slots always filled)."""
    images = np.asarray(images)
    parts = [jax.device_get(_predict_labels(params, images[i:i + chunk])) for i in range(0, len(images), chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def predict_attributes(params, images) -> list[dict]:
    """Attribute dicts ``{"count", "objects": [...]}`` per image, objects canonically ordered (the predicted slots
    for the predicted count, re-sorted by their predicted positions)."""
    return labels_to_attributes(predict_labels(params, images))


def evaluate(params, images, scenes) -> dict:
    """Accuracy per attribute: ``count`` over images; ``shape``/``color``/``size``/``position`` over true objects
    (true canonical slot vs the predicted object in that slot of the canonicalized prediction, wrong if the
    prediction has no such slot); ``all`` = whole attribute dict exactly right."""
    truth = [canonical_attributes(attributes(s)) for s in scenes]
    preds = predict_attributes(params, images)
    acc = {"count": float(np.mean([p["count"] == t["count"] for p, t in zip(preds, truth)]))}
    for k in SLOT_ATTRS:
        hits = [s < len(p["objects"]) and p["objects"][s][k] == o[k]
                for p, t in zip(preds, truth) for s, o in enumerate(t["objects"])]
        acc[k] = float(np.mean(hits))
    acc["all"] = float(np.mean([p == t for p, t in zip(preds, truth)]))
    return acc


# --- persistence -------------------------------------------------------------------------------------------------

def load(path) -> dict:
    """Params from an ``.npz`` with keys ``"<layer>/<name>"``."""
    params: dict = {}
    with np.load(path) as z:
        for key in z.files:
            layer, name = key.split("/", 1)
            params.setdefault(layer, {})[name] = jnp.asarray(z[key])
    return params

