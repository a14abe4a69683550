"""Training code of the shipped demo models (the package itself only runs them: :mod:`pqjax.demo`).

* The text-to-image model (``train_demo_model.py``): FLUX's rectified flow, ``x_t = (1 - t) x0 + t noise``; the
  transformer predicts ``v = noise - x0`` at ``timestep = t`` (sigma units), ``t = sigmoid(N(0, 1))``
  (logit-normal), MSE loss, AdamW; the text encoder (:mod:`pqjax.demo.text_encoder`) is trained jointly. Batches
  come from :func:`pqjax.demo.make_dataset` with a fresh seed per step.
* The ShapeEval classifier (``train_shapeeval.py``): cross entropy on the count and the per-slot attributes of
  freshly generated scenes, part of each batch corrupted by :func:`augment`.

    state = train(seed=0, steps=2000, batch=64)
    save(state, "demo_model"); model = pqjax.demo.model.load("demo_model")
    params = train_classifier(seed=0, steps=1500, augment_fraction=0.5); save_classifier(params, "shapeeval.npz")
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import converters
from pqjax.demo import classifier as C
from pqjax.demo import text_encoder as te
from pqjax.demo.data import make_dataset
from pqjax.demo.model import (CONFIG_FILE, IMAGE_SIZE, PATCH, SCHEDULER, TOKENIZER, DemoModel, DemoModelConfig,
                              encode_text, image_to_tokens)
from pqjax.demo.tokenizer import Tokenizer
from pqjax.io.safetensors import save_file
from pqjax.models import flux
from pqjax.models.common import is_shape
from pqjax.pipeline import prepare_img_ids, prepare_txt_ids

HELDOUT_SEED = 2 ** 31 - 1     # data seed of held-out samples (training steps use data_seed)


# ----------------------------------------------------------------------------------------------
# The text-to-image model
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The architecture (``model``) and the optimizer settings of a training run."""

    model: DemoModelConfig = DemoModelConfig()
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 0         # > 0: cosine decay to 0 over this many steps after warmup; 0: constant rate
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "model"}


@struct.dataclass
class TrainState:
    params: Any                 # {"transformer": flux params, "text_encoder": text encoder params}
    opt_state: Any
    step: jax.Array
    config: TrainConfig = struct.field(pytree_node=False)

    @property
    def model(self) -> DemoModel:
        """The model being trained, as :mod:`pqjax.demo.model` runs it (sampling needs no optimizer state)."""
        return DemoModel(config=self.config.model, params=self.params, step=int(self.step))


def text_encoder_init(c: te.TextEncoderConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Normal(0, std) kernels and embeddings, zero biases, unit LayerNorm scales; ``fc2``/``out`` scaled down by
    sqrt(2 * num_layers) (GPT-2 style)."""
    layout = te.param_layout(c)
    flat, treedef = jax.tree_util.tree_flatten_with_path(layout, is_leaf=is_shape)
    keys = jax.random.split(key, len(flat))
    out = []
    for (path, shape), k in zip(flat, keys):
        names = [p.key for p in path]
        if names[-1] == "scale":
            out.append(jnp.ones(shape, dtype))
        elif names[-1] == "bias":
            out.append(jnp.zeros(shape, dtype))
        else:
            s = std / np.sqrt(2 * c.num_layers) if names[-2] in ("out", "fc2") else std
            out.append((s * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    if cfg.decay_steps > 0:
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(1, cfg.warmup_steps),
                                                max(1, cfg.warmup_steps) + cfg.decay_steps, end_value=0.0)
    else:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, max(1, cfg.warmup_steps))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))


def init(seed: int = 0, config: TrainConfig | None = None) -> TrainState:
    cfg = config or TrainConfig()
    return _init(cfg, jax.random.key(int(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: TrainConfig, key: jax.Array) -> TrainState:
    k_dit, k_txt = jax.random.split(key)
    params = {"transformer": flux.init_params(cfg.model.flux, k_dit, jnp.float32),
              "text_encoder": text_encoder_init(cfg.model.text, k_txt, jnp.float32)}
    return TrainState(params=params, opt_state=optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      config=cfg)


def data_seed(seed: int, step: int) -> int:
    """Seed of ``make_dataset`` for training step ``step`` of run ``seed`` (held-out data uses ``HELDOUT_SEED``)."""
    return (int(seed) * 1_000_003 + int(step)) % (2 ** 31 - 2)


def make_batch(images, captions, max_len: int = DemoModelConfig.max_len, tokenizer: Tokenizer = TOKENIZER) -> dict:
    ids, mask = tokenizer.encode(list(captions), max_len)
    return {"latents": image_to_tokens(images), "ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}


def batch_for_step(seed: int, step: int, batch: int, max_len: int = DemoModelConfig.max_len) -> dict:
    images, captions, _ = make_dataset(batch, seed=data_seed(seed, step))
    return make_batch(images, captions, max_len)


def loss_fn(params, cfg: DemoModelConfig, batch: dict, key: jax.Array) -> jax.Array:
    x0 = batch["latents"]
    B, N, _ = x0.shape
    k_t, k_n = jax.random.split(key)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (B,), jnp.float32))
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    xt = (1.0 - t)[:, None, None] * x0 + t[:, None, None] * noise
    hidden, pooled = encode_text(cfg, params, batch["ids"], batch["mask"])
    side = int(round(np.sqrt(N)))
    v = flux.forward(cfg.flux, params["transformer"], hidden_states=xt, encoder_hidden_states=hidden,
                     pooled_projections=pooled, timestep=t, img_ids=prepare_img_ids(side, side),
                     txt_ids=prepare_txt_ids(hidden.shape[1]))
    return jnp.mean(jnp.square(v - (noise - x0)))


@jax.jit
def train_step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, jax.Array]:
    """One AdamW step on the rectified-flow loss; returns ``(new_state, loss)``."""
    cfg = state.config
    loss, grads = jax.value_and_grad(loss_fn)(state.params, cfg.model, batch, key)
    updates, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), loss


def train(seed: int = 0, steps: int = 1000, batch: int = 32, log_every: int = 50, *,
          config: TrainConfig | None = None, state: TrainState | None = None, losses: list | None = None,
          verbose: bool = True, callback=None, callback_every: int = 0) -> TrainState:
    """Train from ``init(seed)`` (or continue ``state``) for ``steps`` steps; appends each step's loss to ``losses``
    if given, prints the mean loss every ``log_every`` steps and calls ``callback(state)`` every ``callback_every``
    steps (checkpoints). Deterministic in ``seed``."""
    state = state if state is not None else init(seed, config)
    key = jax.random.key(int(seed) + 1)
    window, t0 = [], time.perf_counter()
    for _ in range(int(steps)):
        i = int(state.step)
        b = batch_for_step(seed, i, batch, state.config.model.max_len)
        state, loss = train_step(state, b, jax.random.fold_in(key, i))
        loss = float(loss)
        window.append(loss)
        if losses is not None:
            losses.append(loss)
        if verbose and log_every and (i + 1) % log_every == 0:
            dt = time.perf_counter() - t0
            print(f"step {i + 1:6d}  loss {np.mean(window):.4f}  {dt / len(window):.3f} s/step", flush=True)
            window, t0 = [], time.perf_counter()
        if callback is not None and callback_every and (i + 1) % callback_every == 0:
            callback(state)
    return state


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------

def _flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = np.ascontiguousarray(np.asarray(v, np.float32))
    return out


def save_text_encoder(folder, config: te.TextEncoderConfig, params: dict) -> None:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` (float32)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, te.CONFIG), "w") as f:
        json.dump({"_class_name": "ShapesTextEncoder", **config.to_dict()}, f, indent=2)
    save_file(os.path.join(folder, te.WEIGHTS), _flatten(params), {"format": "np"})


def save(state: TrainState, folder) -> None:
    """``folder/transformer`` (diffusers FluxTransformer2DModel folder), ``folder/text_encoder`` (safetensors +
    config.json), ``folder/tokenizer/vocab.json`` and ``folder/demo_config.json``. Refuses an existing transformer."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    cfg = state.config.model
    converters.save_diffusers(os.path.join(folder, "transformer"), cfg.flux,
                              jax.tree.map(np.asarray, state.params["transformer"]))
    save_text_encoder(os.path.join(folder, "text_encoder"), cfg.text, state.params["text_encoder"])
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    TOKENIZER.save(os.path.join(folder, "tokenizer", "vocab.json"))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"demo_model": {**cfg.to_dict(), **state.config.to_dict()}, "step": int(state.step),
                   "image_size": IMAGE_SIZE, "patch": PATCH, "scheduler": dataclasses.asdict(SCHEDULER)}, f, indent=2)


# ----------------------------------------------------------------------------------------------
# The ShapeEval classifier
# ----------------------------------------------------------------------------------------------

def classifier_init(key, size: int = 32) -> dict:
    """Fresh parameters for ``size`` x ``size`` images (He-normal weights, zero biases)."""
    C.first_stride(size)
    keys = iter(jax.random.split(key, 16))
    params, cin = {}, 3
    for i, cout in enumerate(C.CHANNELS):
        w = jax.random.normal(next(keys), (3, 3, cin, cout), jnp.float32) * np.sqrt(2.0 / (9 * cin))
        params[f"conv{i}"] = {"w": w, "b": jnp.zeros((cout,), jnp.float32)}
        cin = cout
    flat = C.FEATURE_GRID * C.FEATURE_GRID * cin
    params["hidden"] = {"w": jax.random.normal(next(keys), (flat, C.HIDDEN), jnp.float32) * np.sqrt(2.0 / flat),
                        "b": jnp.zeros((C.HIDDEN,), jnp.float32)}
    heads = {"count": len(C.COUNTS), **{k: C.MAX_SLOTS * len(v) for k, v in C.CLASSES.items()}}
    for name, n_out in heads.items():
        w = jax.random.normal(next(keys), (C.HIDDEN, n_out), jnp.float32) / np.sqrt(C.HIDDEN)
        params[f"head_{name}"] = {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}
    return params


def _xent(logits, labels):
    """Mean cross entropy over entries with label >= 0."""
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def classifier_loss(params: dict, images, labels: dict):
    logits = C.apply(params, images)
    return _xent(logits["count"], labels["count"]) + sum(_xent(logits[k], labels[k]) for k in C.SLOT_ATTRS)


def classifier_optimizer(lr: float = 2e-3, steps: int = 1000, weight_decay: float = 1e-4):
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
    return images, C.scenes_to_labels(scenes)


def train_classifier(seed: int = 0, steps: int = 1000, batch: int = 64, size: int = 32, lr: float = 2e-3,
                     log_every: int = 0, data_seed_offset: int = 1_000_000, return_losses: bool = False,
                     augment_fraction: float = 0.0):
    """Train on freshly generated scenes each step (``make_dataset`` seed ``data_seed_offset + seed * steps + step``,
    disjoint from small evaluation seeds); the first ``augment_fraction`` of each batch goes through :func:`augment`.
    Returns params (and the per-step losses if ``return_losses``)."""
    params = classifier_init(jax.random.PRNGKey(seed), size)
    opt = classifier_optimizer(lr, steps)
    opt_state = opt.init(params)
    n_aug = int(round(float(augment_fraction) * batch))
    aug_key = jax.random.PRNGKey(seed + 7919)

    @jax.jit
    def step_fn(params, opt_state, images, labels, step):
        if n_aug:
            images = jnp.asarray(images, jnp.float32)
            images = images.at[:n_aug].set(augment(jax.random.fold_in(aug_key, step), images[:n_aug]))
        loss, grads = jax.value_and_grad(classifier_loss)(params, images, labels)
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


def save_classifier(params: dict, path) -> None:
    """Write ``params`` to an ``.npz`` (keys ``"<layer>/<name>"``)."""
    flat = {f"{layer}/{name}": np.asarray(v) for layer, d in params.items() for name, v in d.items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # file object: np.savez would otherwise append ".npz" to other suffixes
        np.savez(f, **flat)


