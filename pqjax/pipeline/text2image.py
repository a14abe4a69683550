"""Prompt -> image with FLUX in JAX: text encoders -> jitted denoising loop -> VAE decode.

    pipe = converters.load_flux_pipeline("FLUX.1-dev", dtype=jnp.bfloat16)
    images = text_to_image(pipe, ["a photo of a cat"], num_inference_steps=28, height=1024, width=1024, seed=0)
    to_pil(images)[0].save("cat.png")

It reproduces diffusers' ``FluxPipeline(prompt, latents=..., output_type="np")`` stage by stage: CLIP's pooled
output and T5's hidden states (:func:`encode_prompts`, FluxPipeline's ``encode_prompt``), the flow-matching Euler
loop (:func:`pqjax.pipeline.sample`), unpacking, ``latents / scaling_factor + shift_factor``, ``vae.decode`` and
``(x / 2 + 0.5).clamp(0, 1)`` (:func:`decode_images`).

Memory: :func:`text_to_image` runs CLIP, releases it, runs T5, releases it, and only then touches the transformer's
params, so the peak is max(encoders, transformer) rather than their sum (components load lazily; see
:func:`converters.load_flux_pipeline`). Encode a prompt set once with :func:`encode_prompts` and
:meth:`PromptEmbeddings.save` it to skip the encoders entirely later (calibration, benchmarks).

Seeds: :func:`pqjax.pipeline.prepare_latents` defines pqjax's initial noise (for sampling, calibration and
evaluation alike). Image ``i`` gets
``jax.random.normal(fold_in(key(seed), i), (C, H/8, W/8))`` packed like FluxPipeline, so an image depends on the
seed and its index only, not on the batch it is generated in.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.models import clip, t5, vae
from pqjax.models.layers import is_quantized
from .latents import VAE_SCALE_FACTOR, latent_size, prepare_latents, unpack_latents
from .prompts import PromptEmbeddings, as_prompt_list
from .sampler import sample
from .scheduler import FlowMatchConfig

__all__ = ["encode_prompts", "decode_images", "text_to_image", "to_pil", "MAX_SEQUENCE_LENGTH"]

#: FluxPipeline refuses longer T5 sequences.
MAX_SEQUENCE_LENGTH = 512


@functools.partial(jax.jit, static_argnums=0)
def _clip_pooled(config, params, ids):
    return clip.pooled_output(config, params, ids)


@functools.partial(jax.jit, static_argnums=0)
def _t5_hidden(config, params, ids):
    return t5.forward(config, params, ids)


def _check_ids(ids: np.ndarray, vocab_size: int, tokenizer) -> None:
    """JAX clamps out-of-range gathers silently: refuse ids the encoder cannot embed."""
    bad = ids >= vocab_size
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{tokenizer.folder}: prompt {i} produced token id {int(ids[i, j])} (at position {j}), but "
                         f"the encoder's vocabulary has only {vocab_size} entries: tokenizer and encoder do not match")


def _run_encoder(fn, component, tokenizer, prompts, max_length, batch_size):
    """Tokenize all prompts (one truncation warning per prompt), then run the encoder in fixed-size chunks (the
    last one padded with copies of its last row) so every chunk reuses one compilation."""
    ids = tokenizer(prompts, max_length)
    _check_ids(ids, component.config.vocab_size, tokenizer)
    n = len(ids)
    bs = n if not batch_size else min(int(batch_size), n)
    outs = []
    for start in range(0, n, bs):
        chunk = ids[start:start + bs]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), axis=0)])
        outs.append(fn(component.config, component.params, jnp.asarray(padded))[:len(chunk)])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def encode_prompts(pipe, prompts, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH, batch_size: int | None = None,
                   release: bool = False) -> PromptEmbeddings:
    """Prompts -> :class:`PromptEmbeddings` (FluxPipeline's ``encode_prompt``: CLIP pooled + T5 hidden states).

    ``pipe``: what :func:`converters.load_flux_pipeline` returns. CLIP reads ``tokenizer.model_max_length`` (77)
    tokens, T5 ``max_sequence_length`` (<= 512) tokens; longer prompts are truncated with a
    :class:`~pqjax.pipeline.PromptTruncatedWarning`. ``batch_size`` bounds the encoders' activation memory (chunks
    share one compilation). ``release=True`` drops each encoder's params right after it ran, so CLIP and T5 are
    never resident together. The embeddings have the encoders' dtype.
    """
    prompts = as_prompt_list(prompts)
    if not 1 <= int(max_sequence_length) <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}] (FluxPipeline's limit), "
                         f"got {max_sequence_length}")
    for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is None:
            raise ValueError(f"encode_prompts: the pipeline has no {name} (load it with load_flux_pipeline)")
    tok = pipe.tokenizer
    pooled = _run_encoder(_clip_pooled, pipe.text_encoder, tok, prompts, tok.model_max_length, batch_size)
    if release:
        pipe.text_encoder.release()
    hidden = _run_encoder(_t5_hidden, pipe.text_encoder_2, pipe.tokenizer_2, prompts, int(max_sequence_length),
                          batch_size)
    if release:
        pipe.text_encoder_2.release()
    return PromptEmbeddings(hidden, pooled, prompts)


@functools.partial(jax.jit, static_argnames=("config", "height", "width"))
def _decode(config, params, latents, *, height, width):
    z = unpack_latents(latents, height, width, config.scale_factor).astype(jnp.float32)  # scale/shift in fp32
    image = vae.decode_latents(config, params, z)
    image = jnp.clip(image.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)  # VaeImageProcessor.denormalize
    return image.transpose(0, 2, 3, 1)


def decode_images(vae_config: vae.VAEConfig, vae_params, latents, height: int, width: int) -> np.ndarray:
    """Packed FLUX latents ``[B, N, 4*C]`` -> images ``[B, height, width, 3]`` float32 in [0, 1] (NHWC, like
    FluxPipeline's ``output_type="np"``)."""
    latents = jnp.asarray(latents)
    latent_size(height, width, vae_config.scale_factor)  # clear error for sizes that are not multiples of 16
    if latents.ndim != 3 or latents.shape[-1] != 4 * vae_config.latent_channels:
        raise ValueError(f"decode_images: latents must be packed [B, N, {4 * vae_config.latent_channels}], got "
                         f"shape {tuple(latents.shape)}")
    return np.asarray(_decode(vae_config, vae_params, latents, height=int(height), width=int(width)))


def _compute_dtype(params, fallback):
    """The transformer's float dtype (its x_embedder stays 16/32-bit under the default quantization rules)."""
    kernel = params["x_embedder"]["kernel"]
    return kernel.dtype if not is_quantized(kernel) else fallback


def text_to_image(pipe, prompts=None, *, embeddings: PromptEmbeddings | None = None, transformer=None,
                  num_inference_steps: int = 28, guidance_scale: float = 3.5, height: int = 1024, width: int = 1024,
                  seed: int = 0, first_index: int = 0, latents=None,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH, release_text_encoders: bool = True,
                  output_type: str = "np", progress: bool = False,
                  callback: Callable[[int, int], Any] | None = None):
    """Generate images; returns ``[B, height, width, 3]`` float32 numpy in [0, 1] (or the final packed latents with
    ``output_type="latent"``).

    Args:
      pipe: :class:`converters.FluxPipelineComponents` (tokenizers, encoders, transformer, VAE, scheduler config).
      prompts: a string or list of strings; or give ``embeddings`` (from :func:`encode_prompts` or
        :meth:`PromptEmbeddings.load`) and the text encoders are never loaded.
      transformer: ``(FluxConfig, params)`` to run instead of ``pipe.transformer`` (e.g. ``pqjax.quantize``'s
        output); float or quantized, same jitted loop.
      num_inference_steps, guidance_scale, height, width: as FluxPipeline (height/width multiples of 16).
      seed, first_index: initial noise by :func:`prepare_latents` (image ``i`` uses index ``first_index + i``);
        ``latents`` (packed) overrides it.
      release_text_encoders: drop the encoders' params once the prompts are encoded (peak memory =
        max(encoders, transformer)).
      progress, callback: per-step reporting from inside the jitted loop (see :func:`pqjax.pipeline.sample`).
    """
    if output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
    if output_type == "np" and getattr(pipe, "vae", None) is None:
        raise ValueError("text_to_image: the pipeline has no vae to decode with (use output_type='latent')")
    scale = pipe.vae.config.scale_factor if getattr(pipe, "vae", None) is not None else VAE_SCALE_FACTOR
    latent_size(height, width, scale)  # fail on bad sizes before any model runs
    if (prompts is None) == (embeddings is None):
        raise ValueError("give either prompts or embeddings (precomputed PromptEmbeddings), not both or neither")
    if embeddings is None:
        embeddings = encode_prompts(pipe, prompts, max_sequence_length=max_sequence_length,
                                    release=release_text_encoders)

    if transformer is None:
        if getattr(pipe, "transformer", None) is None:
            raise ValueError("text_to_image: the pipeline has no transformer: pass transformer=(config, params)")
        config, params = pipe.transformer.config, pipe.transformer.params
    else:
        config, params = transformer
    dtype = _compute_dtype(params, jnp.asarray(embeddings.prompt_embeds).dtype)
    emb = embeddings.astype(dtype)
    if latents is None:
        latents = prepare_latents(seed, len(emb), height, width, num_channels_latents=config.in_channels // 4,
                                  dtype=dtype, first_index=first_index, vae_scale_factor=scale)
    sched = getattr(pipe, "scheduler_config", None) or FlowMatchConfig()
    out = sample(config, params, latents=latents, encoder_hidden_states=emb.prompt_embeds,
                 pooled_projections=emb.pooled_prompt_embeds, num_inference_steps=num_inference_steps,
                 guidance_scale=guidance_scale, scheduler_config=sched, height=height, width=width,
                 vae_scale_factor=scale, progress=progress, callback=callback)
    if output_type == "latent":
        return out
    return decode_images(pipe.vae.config, pipe.vae.params, out, height, width)


def to_pil(images) -> list:
    """``[B, H, W, 3]`` floats in [0, 1] -> PIL images (diffusers' ``numpy_to_pil``: ``round(x * 255)``)."""
    from PIL import Image

    arr = (np.asarray(images, np.float32) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
