"""FLUX latent packing (2x2 patches) and position ids, matching diffusers' ``FluxPipeline``.

A VAE latent ``[B, C, H, W]`` (C=16 for FLUX) becomes the transformer's token sequence
``[B, (H/2)*(W/2), C*4]``; token ``(i, j)`` (row-major) holds channel-major ``c, dy, dx`` values,
exactly like ``FluxPipeline._pack_latents``. Image token ``(i, j)`` has position id ``(0, i, j)``;
text tokens have id ``(0, 0, 0)``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "VAE_SCALE_FACTOR",
    "latent_size",
    "packed_seq_len",
    "pack_latents",
    "unpack_latents",
    "prepare_img_ids",
    "prepare_txt_ids",
    "prepare_latents",
]

VAE_SCALE_FACTOR = 8  # FLUX's AutoencoderKL: 2 ** (len(block_out_channels) - 1)


def latent_size(height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> tuple[int, int]:
    """Image ``(height, width)`` in pixels -> VAE latent ``(H, W)``: ``2 * (size // (vae_scale_factor * 2))``.

    FluxPipeline silently rounds sizes that are not multiples of ``vae_scale_factor * 2`` down (and
    so would not give the image size asked for); we refuse them instead.
    """
    m = 2 * int(vae_scale_factor)
    for name, v in (("height", height), ("width", width)):
        if int(v) != v or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if int(v) % m != 0:
            raise ValueError(f"{name}={v} is not divisible by {m} (vae_scale_factor {vae_scale_factor} x the 2x2 "
                             f"latent patch); FLUX needs image sizes that are multiples of {m}, e.g. "
                             f"{max(m, int(v) // m * m)} or {(int(v) // m + 1) * m}")
    return 2 * (int(height) // m), 2 * (int(width) // m)


def packed_seq_len(height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
    """Number of image tokens ``(H/2) * (W/2)`` for an image of ``height x width`` pixels."""
    h, w = latent_size(height, width, vae_scale_factor)
    return (h // 2) * (w // 2)


def pack_latents(latents: jnp.ndarray) -> jnp.ndarray:
    """``[B, C, H, W] -> [B, (H/2)*(W/2), C*4]`` (``FluxPipeline._pack_latents``)."""
    if latents.ndim != 4:
        raise ValueError(f"pack_latents expects [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent height and width must be even, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    x = x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: jnp.ndarray, height: int, width: int,
                   vae_scale_factor: int = VAE_SCALE_FACTOR) -> jnp.ndarray:
    """``[B, (H/2)*(W/2), C*4] -> [B, C, H, W]`` (``FluxPipeline._unpack_latents``).

    ``height``/``width`` are the *image* sizes in pixels, as in diffusers.
    """
    if latents.ndim != 3:
        raise ValueError(f"unpack_latents expects packed latents [B, N, C*4], got shape {tuple(latents.shape)}")
    b, n, ch = latents.shape
    h, w = latent_size(height, width, vae_scale_factor)
    if n != (h // 2) * (w // 2) or ch % 4:
        raise ValueError(f"unpack_latents: packed latents {tuple(latents.shape)} do not fit a {height}x{width} "
                         f"image (expected [B, {(h // 2) * (w // 2)}, 4*C])")
    x = latents.reshape(b, h // 2, w // 2, ch // 4, 2, 2)
    x = x.transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def prepare_img_ids(height: int, width: int, dtype=jnp.float32) -> jnp.ndarray:
    """Image position ids ``[height*width, 3]``: row ``i*width + j`` is ``(0, i, j)``.

    ``height``/``width`` are in *packed tokens* (latent size // 2), like
    ``FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, ...)``.
    """
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return jnp.asarray(ids.reshape(height * width, 3), dtype)


def prepare_txt_ids(num_txt_tokens: int, dtype=jnp.float32) -> jnp.ndarray:
    """Text position ids: zeros ``[num_txt_tokens, 3]`` (FluxPipeline's ``text_ids``)."""
    return jnp.zeros((int(num_txt_tokens), 3), dtype)


def prepare_latents(seed: int, batch_size: int, height: int, width: int, *, num_channels_latents: int = 16,
                    dtype=jnp.float32, first_index: int = 0, vae_scale_factor: int = VAE_SCALE_FACTOR) -> jax.Array:
    """pqjax's seed-derived initial noise, packed ``[B, (h/2)*(w/2), 4*C]`` (what FluxPipeline's ``latents=`` takes).

    Image ``first_index + i`` gets ``normal(fold_in(key(seed), first_index + i), (C, h, w))`` in float32 (``h, w``:
    the latent size of a ``height x width`` image), packed in 2x2 patches and cast to ``dtype``.
    """
    h, w = latent_size(height, width, vae_scale_factor)
    key = jax.random.key(int(seed))
    return _noise(key, int(first_index), int(batch_size), (int(num_channels_latents), h, w)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _noise(key, first_index, batch_size, shape):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(batch_size))
    return pack_latents(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys))
