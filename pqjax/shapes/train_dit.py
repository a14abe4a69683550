"""Train a small FLUX-architecture text-to-image model on the shapes data, in pixel space (no VAE).

Pixel <-> "latent" mapping (exact inverse; see :func:`image_to_latent` / :func:`latent_to_image`)::

    uint8 [B, 32, 32, 3]  --/127.5 - 1-->  [-1, 1] float, NCHW [B, 3, 32, 32]
        --space-to-depth 2x2-->  [B, 12, 16, 16]      (channel = c*4 + dy*2 + dx; the "VAE latent", 12 channels)
        --pipeline.pack_latents (2x2)-->  [B, 64, 48]  (the transformer's tokens: in_channels = 4*12 = 48)

so the pixel->latent factor plays the role of ``vae_scale_factor`` (= 2) in :func:`pqjax.pipeline.sample`. Each of the
64 image tokens covers 4x4 pixels, and its 48 values fit in the model width D = 128 with room to spare: a token wider
than D (e.g. 4x4 space-to-depth, 192 values per token) cannot carry the noise through the network, and samples keep
salt-and-pepper noise. ``x_embedder`` (K = 48) and ``proj_out`` stay in float under the default rules (as in FLUX
practice), so every linear that is quantized has K a multiple of 64 (64, 256, D, 4D, D + 4D).

Training is FLUX's rectified flow: ``x_t = (1 - t) x0 + t noise``, the transformer predicts ``v = noise - x0`` at
``timestep = t`` (sigma units), ``t = sigmoid(N(0, 1))`` (logit-normal), MSE loss, AdamW; the text encoder
(:mod:`pqjax.shapes.text_encoder`) is trained jointly. Batches come from :func:`pqjax.shapes.make_dataset` with a
fresh seed per step. Sampling is :func:`pqjax.pipeline.sample` with a static-shift (shift=1) Euler schedule.

    state = train(seed=0, steps=2000, batch=64)
    images = generate(state, ["a red circle at the top"], seed=0, steps=20)   # uint8 [1, 32, 32, 3]
    save(state, "demo_model"); state = load("demo_model")
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from pqjax.models import flux
from pqjax.models.flux import FluxConfig
from pqjax.pipeline import FlowMatchConfig, pack_latents, prepare_img_ids, prepare_txt_ids, sample, unpack_latents
from pqjax.shapes import text_encoder as te
from pqjax.shapes.data import MAX_CAPTION_WORDS, make_dataset
from pqjax.shapes.tokenizer import Tokenizer

IMAGE_SIZE = 32
PATCH = 2                      # space-to-depth factor: the "vae_scale_factor" of this pixel-space model
CHANNELS = 3 * PATCH * PATCH   # 12 latent channels
SCHEDULER = FlowMatchConfig(use_dynamic_shifting=False, shift=1.0)


# ----------------------------------------------------------------------------------------------
# Pixels <-> latents
# ----------------------------------------------------------------------------------------------

def image_to_latent(images) -> jax.Array:
    """uint8 ``[B, 32, 32, 3]`` -> float32 latents ``[B, 12, 16, 16]`` in [-1, 1] (space-to-depth 2x2, channel-major)."""
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % PATCH or x.shape[2] % PATCH:
        raise ValueError(f"image_to_latent expects [B, H, W, 3] with H, W multiples of {PATCH}, got {x.shape}")
    b, h, w, _ = x.shape
    x = x.astype(jnp.float32) / 127.5 - 1.0
    x = x.transpose(0, 3, 1, 2).reshape(b, 3, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, CHANNELS, h // PATCH, w // PATCH)


def latent_to_image(latents) -> np.ndarray:
    """Inverse of :func:`image_to_latent`: ``[B, 12, h, w]`` -> uint8 ``[B, 2h, 2w, 3]`` (clipped to [-1, 1], rounded)."""
    x = jnp.asarray(latents, jnp.float32)
    if x.ndim != 4 or x.shape[1] != CHANNELS:
        raise ValueError(f"latent_to_image expects [B, {CHANNELS}, h, w], got {x.shape}")
    b, _, h, w = x.shape
    x = x.reshape(b, 3, PATCH, PATCH, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, 3, h * PATCH, w * PATCH)
    x = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5)
    return np.asarray(x.transpose(0, 2, 3, 1)).astype(np.uint8)


def image_to_tokens(images) -> jax.Array:
    """uint8 ``[B, 32, 32, 3]`` -> packed transformer input ``[B, 64, 48]``."""
    return pack_latents(image_to_latent(images))


def tokens_to_image(tokens, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    return latent_to_image(unpack_latents(jnp.asarray(tokens), height, width, vae_scale_factor=PATCH))


# ----------------------------------------------------------------------------------------------
# Config and state
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DemoModelConfig:
    """The demo model: a small FLUX transformer (``.flux``), a text encoder (``.text``) and training settings."""

    num_attention_heads: int = 2
    attention_head_dim: int = 64
    axes_dims_rope: tuple[int, ...] = (8, 28, 28)
    num_layers: int = 2
    num_single_layers: int = 2
    text_dim: int = 64           # joint_attention_dim
    pooled_dim: int = 64         # pooled_projection_dim
    text_layers: int = 2
    text_heads: int = 2
    max_len: int = 16            # caption tokens (MAX_CAPTION_WORDS = 15)
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 0         # > 0: cosine decay to 0 over this many steps after warmup; 0: constant rate
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.max_len < MAX_CAPTION_WORDS:
            raise ValueError(f"max_len={self.max_len} < MAX_CAPTION_WORDS={MAX_CAPTION_WORDS}: captions would be cut")

    @property
    def flux(self) -> FluxConfig:
        return FluxConfig(patch_size=1, in_channels=4 * CHANNELS, num_layers=self.num_layers,
                          num_single_layers=self.num_single_layers, attention_head_dim=self.attention_head_dim,
                          num_attention_heads=self.num_attention_heads, joint_attention_dim=self.text_dim,
                          pooled_projection_dim=self.pooled_dim, guidance_embeds=False,
                          axes_dims_rope=self.axes_dims_rope)

    @property
    def text(self) -> te.TextEncoderConfig:
        return te.TextEncoderConfig(vocab_size=max(64, len(Tokenizer())), hidden_dim=self.text_dim,
                                    pooled_dim=self.pooled_dim, num_layers=self.text_layers,
                                    num_heads=self.text_heads, max_positions=max(32, self.max_len))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DemoModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@struct.dataclass
class TrainState:
    params: Any                 # {"transformer": flux params, "text_encoder": text encoder params}
    opt_state: Any
    step: jax.Array
    config: DemoModelConfig = struct.field(pytree_node=False)


def _optimizer(cfg: DemoModelConfig) -> optax.GradientTransformation:
    if cfg.decay_steps > 0:
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(1, cfg.warmup_steps),
                                                max(1, cfg.warmup_steps) + cfg.decay_steps, end_value=0.0)
    else:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, max(1, cfg.warmup_steps))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))


def init(seed: int = 0, config: DemoModelConfig | None = None) -> TrainState:
    cfg = config or DemoModelConfig()
    return _init(cfg, jax.random.key(int(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: DemoModelConfig, key: jax.Array) -> TrainState:
    k_dit, k_txt = jax.random.split(key)
    params = {"transformer": flux.init_params(cfg.flux, k_dit, jnp.float32),
              "text_encoder": te.init_params(cfg.text, k_txt, jnp.float32)}
    return TrainState(params=params, opt_state=_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      config=cfg)


# ----------------------------------------------------------------------------------------------
# Data and training
# ----------------------------------------------------------------------------------------------

_TOKENIZER = Tokenizer()


def data_seed(seed: int, step: int) -> int:
    """Seed of ``make_dataset`` for training step ``step`` of run ``seed`` (held-out data uses ``HELDOUT_SEED``)."""
    return (int(seed) * 1_000_003 + int(step)) % (2 ** 31 - 2)


HELDOUT_SEED = 2 ** 31 - 1


def make_batch(images, captions, max_len: int = DemoModelConfig.max_len, tokenizer: Tokenizer = _TOKENIZER) -> dict:
    ids, mask = tokenizer.encode(list(captions), max_len)
    return {"latents": image_to_tokens(images), "ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}


def batch_for_step(seed: int, step: int, batch: int, max_len: int = DemoModelConfig.max_len) -> dict:
    images, captions, _ = make_dataset(batch, seed=data_seed(seed, step))
    return make_batch(images, captions, max_len)


def _encode_text(cfg: DemoModelConfig, params, ids, mask):
    return te.encode(params["text_encoder"], ids, mask, num_heads=cfg.text_heads)


def loss_fn(params, cfg: DemoModelConfig, batch: dict, key: jax.Array) -> jax.Array:
    x0 = batch["latents"]
    B, N, _ = x0.shape
    k_t, k_n = jax.random.split(key)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (B,), jnp.float32))
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    xt = (1.0 - t)[:, None, None] * x0 + t[:, None, None] * noise
    hidden, pooled = _encode_text(cfg, params, batch["ids"], batch["mask"])
    side = int(round(np.sqrt(N)))
    v = flux.forward(cfg.flux, params["transformer"], hidden_states=xt, encoder_hidden_states=hidden,
                     pooled_projections=pooled, timestep=t, img_ids=prepare_img_ids(side, side),
                     txt_ids=prepare_txt_ids(hidden.shape[1]))
    return jnp.mean(jnp.square(v - (noise - x0)))


@jax.jit
def train_step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, jax.Array]:
    """One AdamW step on the rectified-flow loss; returns ``(new_state, loss)``."""
    cfg = state.config
    loss, grads = jax.value_and_grad(loss_fn)(state.params, cfg, batch, key)
    updates, opt_state = _optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), loss


def train(seed: int = 0, steps: int = 1000, batch: int = 32, log_every: int = 50, *,
          config: DemoModelConfig | None = None, state: TrainState | None = None, losses: list | None = None,
          verbose: bool = True, callback=None, callback_every: int = 0) -> TrainState:
    """Train from ``init(seed)`` (or continue ``state``) for ``steps`` steps; appends each step's loss to ``losses``
    if given, prints the mean loss every ``log_every`` steps and calls ``callback(state)`` every ``callback_every``
    steps (checkpoints). Deterministic in ``seed``."""
    state = state if state is not None else init(seed, config)
    key = jax.random.key(int(seed) + 1)
    window, t0 = [], time.perf_counter()
    for _ in range(int(steps)):
        i = int(state.step)
        b = batch_for_step(seed, i, batch, state.config.max_len)
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
# Sampling
# ----------------------------------------------------------------------------------------------

def initial_noise(seed: int, batch: int, start: int = 0) -> jax.Array:
    """Packed noise ``[B, 64, 48]``: image ``i`` gets ``normal(fold_in(key(seed), start + i), [12, 16, 16])``."""
    key = jax.random.key(int(seed))
    s = IMAGE_SIZE // PATCH
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + int(batch)))
    noise = jax.vmap(lambda k: jax.random.normal(k, (CHANNELS, s, s), jnp.float32))(keys)
    return pack_latents(noise)


def encode_captions(state: TrainState, captions) -> tuple[jax.Array, jax.Array]:
    ids, mask = _TOKENIZER.encode(list(captions), state.config.max_len)
    return _encode_text(state.config, state.params, jnp.asarray(ids), jnp.asarray(mask))


def generate(state: TrainState, captions, seed: int = 0, steps: int = 20, *, transformer=None,
             chunk: int = 64) -> np.ndarray:
    """uint8 images ``[len(captions), 32, 32, 3]`` sampled with ``steps`` Euler steps (static shift 1.0).

    ``transformer``: params to sample with instead of ``state.params["transformer"]`` (e.g. quantized ones; the text
    encoder stays float). Captions run in chunks of ``chunk`` (the last one padded, so one compiled shape); image ``i``
    always gets the same noise (:func:`initial_noise`), whatever the chunking."""
    return tokens_to_image(generate_latents(state, captions, seed, steps, transformer=transformer, chunk=chunk))


def generate_latents(state: TrainState, captions, seed: int = 0, steps: int = 20, *, transformer=None,
                     chunk: int = 64) -> np.ndarray:
    """Like :func:`generate` but returns the final packed latents ``[len(captions), 64, 48]`` (float32)."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    dit = state.params["transformer"] if transformer is None else transformer
    n, chunk = len(captions), max(1, min(int(chunk), len(captions)))
    out = []
    for start in range(0, n, chunk):
        part = captions[start:start + chunk]
        part = part + [part[-1]] * (chunk - len(part))
        hidden, pooled = encode_captions(state, part)
        lat = sample(state.config.flux, dit, latents=initial_noise(seed, chunk, start), encoder_hidden_states=hidden,
                     pooled_projections=pooled, num_inference_steps=int(steps), scheduler_config=SCHEDULER,
                     height=IMAGE_SIZE, width=IMAGE_SIZE, vae_scale_factor=PATCH)
        out.append(np.asarray(lat, np.float32)[:min(chunk, n - start)])
    s = IMAGE_SIZE // PATCH // 2
    return np.concatenate(out) if out else np.zeros((0, s * s, 4 * CHANNELS), np.float32)


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------

def save(state: TrainState, folder) -> None:
    """``folder/transformer`` (diffusers FluxTransformer2DModel folder), ``folder/text_encoder`` (safetensors +
    config.json), ``folder/tokenizer/vocab.json`` and ``folder/demo_config.json``. Refuses an existing transformer."""
    import converters  # local: converters imports pqjax

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    cfg = state.config
    converters.save_diffusers(os.path.join(folder, "transformer"), cfg.flux,
                              jax.tree.map(np.asarray, state.params["transformer"]))
    te.save(os.path.join(folder, "text_encoder"), cfg.text, state.params["text_encoder"])
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    _TOKENIZER.save(os.path.join(folder, "tokenizer", "vocab.json"))
    with open(os.path.join(folder, "demo_config.json"), "w") as f:
        json.dump({"demo_model": cfg.to_dict(), "step": int(state.step), "image_size": IMAGE_SIZE,
                   "patch": PATCH, "scheduler": dataclasses.asdict(SCHEDULER)}, f, indent=2)


def load(folder) -> TrainState:
    """Inverse of :func:`save` (params exact; the optimizer state starts fresh)."""
    import converters

    folder = os.fspath(folder)
    with open(os.path.join(folder, "demo_config.json")) as f:
        meta = json.load(f)
    cfg = DemoModelConfig.from_dict(meta["demo_model"])
    flux_cfg, dit = converters.load_flux(os.path.join(folder, "transformer"), dtype=jnp.float32)
    if flux_cfg != cfg.flux:
        raise ValueError(f"{folder}: transformer config {flux_cfg} does not match demo_config.json ({cfg.flux})")
    text_cfg, txt = te.load(os.path.join(folder, "text_encoder"))
    if text_cfg != cfg.text:
        raise ValueError(f"{folder}: text encoder config {text_cfg} does not match demo_config.json ({cfg.text})")
    tok = Tokenizer.load(os.path.join(folder, "tokenizer", "vocab.json"))
    if tok.vocab != _TOKENIZER.vocab:
        raise ValueError(f"{folder}: tokenizer vocabulary differs from pqjax.shapes.Tokenizer()")
    params = {"transformer": dit, "text_encoder": txt}
    return TrainState(params=params, opt_state=_optimizer(cfg).init(params),
                      step=jnp.asarray(meta.get("step", 0), jnp.int32), config=cfg)
