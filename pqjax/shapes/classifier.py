"""ShapeEval: a small pure-JAX CNN that reads a shapes image back into its attributes.

It predicts the object count (1 or 2) and, for up to two object *slots*, the shape, colour, size and position.
Slots are in a canonical order (see ``canonical_objects``): objects sorted by the position's centre ``(x, y)``, so
left comes before right and top before bottom.  Two-object scenes always sit at opposite positions (left/right or
top/bottom), so the order is well defined; labels and predictions are canonicalized the same way.

Pure functional: ``params`` is a nested dict of arrays and ``apply(params, images) -> dict of logits`` with
``"count"`` [B, 2] and ``"shape"`` / ``"color"`` / ``"size"`` / ``"position"`` [B, 2, n_classes] (slot axis 1).
Images are uint8 (or float in [0, 255]) ``[B, S, S, 3]`` with ``S`` = 32 or 64 (the ``size`` the model was built for).

    params = train(seed=0, steps=2000, batch=64, size=32)
    evaluate(params, images, scenes)        # {"count": 1.0, "shape": 0.99, ...}
    predict_attributes(params, images)      # [{"count": 1, "objects": [{...}]}, ...]
    save(params, "shapeeval.npz"); params = load("shapeeval.npz")
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pqjax.shapes.data import COLORS, POSITIONS, SHAPES, SIZES, attributes, make_dataset

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

def _first_stride(size: int) -> int:
    if size not in (32, 64):
        raise ValueError(f"image size must be 32 or 64, got {size}")
    return size // 32


def init(key, size: int = 32) -> dict:
    """Fresh parameters for ``size`` x ``size`` images (He-normal weights, zero biases)."""
    _first_stride(size)
    keys = iter(jax.random.split(key, 16))
    params, cin = {}, 3
    for i, cout in enumerate(CHANNELS):
        w = jax.random.normal(next(keys), (3, 3, cin, cout), jnp.float32) * np.sqrt(2.0 / (9 * cin))
        params[f"conv{i}"] = {"w": w, "b": jnp.zeros((cout,), jnp.float32)}
        cin = cout
    flat = FEATURE_GRID * FEATURE_GRID * cin
    params["hidden"] = {"w": jax.random.normal(next(keys), (flat, HIDDEN), jnp.float32) * np.sqrt(2.0 / flat),
                        "b": jnp.zeros((HIDDEN,), jnp.float32)}
    heads = {"count": len(COUNTS), **{k: MAX_SLOTS * len(v) for k, v in CLASSES.items()}}
    for name, n_out in heads.items():
        params[f"head_{name}"] = {"w": jax.random.normal(next(keys), (HIDDEN, n_out), jnp.float32) / np.sqrt(HIDDEN),
                                  "b": jnp.zeros((n_out,), jnp.float32)}
    return params


def _conv(x, p, stride):
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + p["b"])


def apply(params: dict, images) -> dict:
    """Logits: ``"count"`` [B, 2]; ``"shape"``/``"color"``/``"size"``/``"position"`` [B, MAX_SLOTS, n_classes]."""
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    size = x.shape[1]
    strides = (_first_stride(size), 2, 2)
    for i, stride in enumerate(strides):
        x = _conv(x, params[f"conv{i}"], stride)
    x = x.reshape(x.shape[0], -1)
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    out = {"count": h @ params["head_count"]["w"] + params["head_count"]["b"]}
    for k, v in CLASSES.items():
        p = params[f"head_{k}"]
        out[k] = (h @ p["w"] + p["b"]).reshape(h.shape[0], MAX_SLOTS, len(v))
    return out


def _xent(logits, labels):
    """Mean cross entropy over entries with label >= 0."""
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def loss_fn(params: dict, images, labels: dict):
    logits = apply(params, images)
    return _xent(logits["count"], labels["count"]) + sum(_xent(logits[k], labels[k]) for k in SLOT_ATTRS)


# --- training ----------------------------------------------------------------------------------------------------

def make_optimizer(lr: float = 2e-3, steps: int = 1000, weight_decay: float = 1e-4):
    warmup = max(1, min(50, steps // 10))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))


def augment(key, images):
    """Random corruptions of uint8-valued ``[B, S, S, 3]`` images, so the classifier reads generated images (noisy,
    slightly blurred, off-colour, off by a pixel) as it reads clean ones: a 1-pixel shift (probability 1/2), a
    [1 2 1]^2 blur of random strength, a per-image colour offset (std 8) and gaussian noise (std up to 24), all in
    0..255 units and clipped. Returns float32."""
    x = jnp.asarray(images, jnp.float32)
    b = x.shape[0]
    k_shift, k_dir, k_blur, k_col, k_sig, k_noise = jax.random.split(key, 6)
    shifted = jnp.stack([jnp.roll(x, s, axis=a) for a in (1, 2) for s in (-1, 1)])      # [4, B, S, S, 3]
    pick = jax.random.randint(k_dir, (b,), 0, 4)
    shifted = jnp.take_along_axis(shifted, pick[None, :, None, None, None], axis=0)[0]
    x = jnp.where(jax.random.bernoulli(k_shift, 0.5, (b, 1, 1, 1)), shifted, x)
    w = jnp.array([1.0, 2.0, 1.0]) / 4.0
    kern = jnp.tile((w[:, None] * w[None, :])[:, :, None, None], (1, 1, 1, 3))         # HWIO, depthwise
    blurred = jax.lax.conv_general_dilated(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"), kern,
                                           (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           feature_group_count=3)
    x = x + jax.random.uniform(k_blur, (b, 1, 1, 1)) * (blurred - x)
    x = x + 8.0 * jax.random.normal(k_col, (b, 1, 1, 3))
    x = x + jax.random.uniform(k_sig, (b, 1, 1, 1), maxval=24.0) * jax.random.normal(k_noise, x.shape)
    return jnp.clip(x, 0.0, 255.0)


def batch_data(seed: int, batch: int, size: int):
    """One freshly generated training batch: (uint8 images, label dict)."""
    images, _, scenes = make_dataset(batch, seed=seed, size=size)
    return images, scenes_to_labels(scenes)


def train(seed: int = 0, steps: int = 1000, batch: int = 64, size: int = 32, lr: float = 2e-3,
          log_every: int = 0, data_seed_offset: int = 1_000_000, return_losses: bool = False,
          augment_fraction: float = 0.0):
    """Train on freshly generated scenes each step (``make_dataset`` seed ``data_seed_offset + seed * steps + step``,
    disjoint from small evaluation seeds); the first ``augment_fraction`` of each batch goes through :func:`augment`.
    Returns params (and the per-step losses if ``return_losses``)."""
    params = init(jax.random.PRNGKey(seed), size)
    opt = make_optimizer(lr, steps)
    opt_state = opt.init(params)
    n_aug = int(round(float(augment_fraction) * batch))
    aug_key = jax.random.PRNGKey(seed + 7919)

    @jax.jit
    def step_fn(params, opt_state, images, labels, step):
        if n_aug:
            images = jnp.asarray(images, jnp.float32)
            images = images.at[:n_aug].set(augment(jax.random.fold_in(aug_key, step), images[:n_aug]))
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for step in range(steps):
        images, labels = batch_data(data_seed_offset + seed * steps + step, batch, size)
        params, opt_state, loss = step_fn(params, opt_state, images, labels, step)
        losses.append(loss)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {float(loss):.4f}", flush=True)
    losses = [float(x) for x in losses]
    return (params, losses) if return_losses else params


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

def save(params: dict, path) -> None:
    """Write ``params`` to an ``.npz`` (keys ``"<layer>/<name>"``)."""
    flat = {f"{layer}/{name}": np.asarray(v) for layer, d in params.items() for name, v in d.items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # file object: np.savez would otherwise append ".npz" to other suffixes
        np.savez(f, **flat)


def load(path) -> dict:
    params: dict = {}
    with np.load(path) as z:
        for key in z.files:
            layer, name = key.split("/", 1)
            params.setdefault(layer, {})[name] = jnp.asarray(z[key])
    return params

