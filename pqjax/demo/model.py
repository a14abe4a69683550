"""The demo text-to-image model: a small FLUX-architecture transformer in pixel space (no VAE) and its text encoder.

Pixel <-> "latent" mapping (exact inverse; see :func:`image_to_latent` / :func:`latent_to_image`)::

    uint8 [B, 32, 32, 3]  --/127.5 - 1-->  [-1, 1] float, NCHW [B, 3, 32, 32]
        --space-to-depth 2x2-->  [B, 12, 16, 16]      (channel = c*4 + dy*2 + dx; the "VAE latent", 12 channels)
        --pipeline.pack_latents (2x2)-->  [B, 64, 48]  (the transformer's tokens: in_channels = 4*12 = 48)

so the pixel->latent factor plays the role of ``vae_scale_factor`` (= 2) in :func:`pqjax.pipeline.sample`. Each of the
64 image tokens covers 4x4 pixels, and its 48 values fit in the model width D = 128 with room to spare.
``x_embedder`` (K = 48) and ``proj_out`` stay in float under the default rules (as in FLUX practice), so every linear
that is quantized has K a multiple of 64 (64, 256, D, 4D, D + 4D). Sampling is :func:`pqjax.pipeline.sample` with a
static-shift (shift=1) Euler schedule from :func:`pqjax.pipeline.prepare_latents` noise.

    model = load(folder)                                   # the shipped one: pqjax.demo.assets.load_demo_model()
    images = generate(model, ["a red circle at the top"], seed=0, steps=20)   # uint8 [1, 32, 32, 3]

This module only runs the model; it was trained by ``examples/train_demo_model.py`` (rectified flow, the text
encoder trained jointly; the training code is ``examples/demo_training.py``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import converters
from pqjax.demo import text_encoder as te
from pqjax.demo.data import MAX_CAPTION_WORDS
from pqjax.demo.tokenizer import Tokenizer
from pqjax.models.flux import FluxConfig
from pqjax.pipeline import FlowMatchConfig, pack_latents, prepare_latents, sample, unpack_latents

__all__ = ["IMAGE_SIZE", "PATCH", "CHANNELS", "SCHEDULER", "TOKENIZER", "DemoModelConfig", "DemoModel",
           "image_to_latent", "latent_to_image", "image_to_tokens", "tokens_to_image", "encode_text",
           "encode_captions", "initial_noise", "generate", "generate_latents", "load"]

IMAGE_SIZE = 32
PATCH = 2                      # space-to-depth factor: the "vae_scale_factor" of this pixel-space model
CHANNELS = 3 * PATCH * PATCH   # 12 latent channels
SCHEDULER = FlowMatchConfig(use_dynamic_shifting=False, shift=1.0)
TOKENIZER = Tokenizer()
CONFIG_FILE = "demo_config.json"


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
# The model
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DemoModelConfig:
    """The demo model's architecture: a small FLUX transformer (``.flux``) and a text encoder (``.text``)."""

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
        return te.TextEncoderConfig(vocab_size=max(64, len(TOKENIZER)), hidden_dim=self.text_dim,
                                    pooled_dim=self.pooled_dim, num_layers=self.text_layers,
                                    num_heads=self.text_heads, max_positions=max(32, self.max_len))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DemoModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})  # a file's training settings are not ours


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """The demo model's weights: ``params = {"transformer": flux params, "text_encoder": text encoder params}``;
    ``step``: training steps it had."""

    config: DemoModelConfig
    params: Any
    step: int = 0


def encode_text(config: DemoModelConfig, params, ids, mask) -> tuple[jax.Array, jax.Array]:
    """Token ids / mask -> ``(encoder_hidden_states, pooled_projections)`` with the model's text encoder."""
    return te.encode(params["text_encoder"], ids, mask, num_heads=config.text_heads)


def encode_captions(model: DemoModel, captions) -> tuple[jax.Array, jax.Array]:
    ids, mask = TOKENIZER.encode(list(captions), model.config.max_len)
    return encode_text(model.config, model.params, jnp.asarray(ids), jnp.asarray(mask))


def initial_noise(seed: int, batch: int, start: int = 0) -> jax.Array:
    """Packed noise ``[B, 64, 48]`` (:func:`pqjax.pipeline.prepare_latents`): image ``i`` gets
    ``normal(fold_in(key(seed), start + i), [12, 16, 16])``."""
    return prepare_latents(seed, batch, IMAGE_SIZE, IMAGE_SIZE, num_channels_latents=CHANNELS, first_index=start,
                           vae_scale_factor=PATCH)


def generate(model: DemoModel, captions, seed: int = 0, steps: int = 20, *, transformer=None,
             chunk: int = 64) -> np.ndarray:
    """uint8 images ``[len(captions), 32, 32, 3]`` sampled with ``steps`` Euler steps (static shift 1.0).

    ``transformer``: params to sample with instead of ``model.params["transformer"]`` (e.g. quantized ones; the text
    encoder stays float). Captions run in chunks of ``chunk`` (the last one padded, so one compiled shape); image ``i``
    always gets the same noise (:func:`initial_noise`), whatever the chunking."""
    return tokens_to_image(generate_latents(model, captions, seed, steps, transformer=transformer, chunk=chunk))


def generate_latents(model: DemoModel, captions, seed: int = 0, steps: int = 20, *, transformer=None,
                     chunk: int = 64) -> np.ndarray:
    """Like :func:`generate` but returns the final packed latents ``[len(captions), 64, 48]`` (float32)."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    dit = model.params["transformer"] if transformer is None else transformer
    n, chunk = len(captions), max(1, min(int(chunk), len(captions)))
    out = []
    for start in range(0, n, chunk):
        part = captions[start:start + chunk]
        part = part + [part[-1]] * (chunk - len(part))
        hidden, pooled = encode_captions(model, part)
        lat = sample(model.config.flux, dit, latents=initial_noise(seed, chunk, start), encoder_hidden_states=hidden,
                     pooled_projections=pooled, num_inference_steps=int(steps), scheduler_config=SCHEDULER,
                     height=IMAGE_SIZE, width=IMAGE_SIZE, vae_scale_factor=PATCH)
        out.append(np.asarray(lat, np.float32)[:min(chunk, n - start)])
    s = IMAGE_SIZE // PATCH // 2
    return np.concatenate(out) if out else np.zeros((0, s * s, 4 * CHANNELS), np.float32)


def load(folder) -> DemoModel:
    """A saved demo model: ``folder/transformer`` (a diffusers ``FluxTransformer2DModel`` folder, read by
    ``converters.load_flux``), ``folder/text_encoder`` (config.json + model.safetensors),
    ``folder/tokenizer/vocab.json`` and ``folder/demo_config.json``; every part checked against the config."""
    folder = os.fspath(folder)
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        meta = json.load(f)
    cfg = DemoModelConfig.from_dict(meta["demo_model"])
    flux_cfg, dit = converters.load_flux(os.path.join(folder, "transformer"), dtype=jnp.float32)
    if flux_cfg != cfg.flux:
        raise ValueError(f"{folder}: transformer config {flux_cfg} does not match {CONFIG_FILE} ({cfg.flux})")
    text_cfg, txt = te.load(os.path.join(folder, "text_encoder"))
    if text_cfg != cfg.text:
        raise ValueError(f"{folder}: text encoder config {text_cfg} does not match {CONFIG_FILE} ({cfg.text})")
    tok = Tokenizer.load(os.path.join(folder, "tokenizer", "vocab.json"))
    if tok.vocab != TOKENIZER.vocab:
        raise ValueError(f"{folder}: tokenizer vocabulary differs from pqjax.demo.Tokenizer()")
    return DemoModel(config=cfg, params={"transformer": dit, "text_encoder": txt}, step=int(meta.get("step", 0)))
