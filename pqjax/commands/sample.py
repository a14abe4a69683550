"""``pqjax sample MODEL --prompt TEXT | --prompts FILE | --embeddings FILE ... --out PATH``: prompts to PNG images.

MODEL is a diffusers FLUX pipeline folder, or a pqjax checkpoint (its transformer, float or quantized) together with
``--components FOLDER``, the pipeline folder that supplies tokenizers, text encoders, VAE and scheduler. All prompts
are encoded first and the text encoders released before the transformer is loaded (peak memory = max(encoders,
transformer)). Image ``i`` (over all prompts) starts from ``prepare_latents(seed, ..., first_index=i)``, so images do
not depend on ``--batch-size``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from pqjax.cli import CommandError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DTYPES = ("bfloat16", "float32")  # not float16: T5 overflows in it


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="generate images from prompts (FLUX in JAX)",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL", help="diffusers FLUX pipeline folder, or a pqjax checkpoint "
                   "(then --components is required)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (blank lines skipped)")
    src.add_argument("--embeddings", metavar="FILE", help="precomputed prompt embeddings (.safetensors written by "
                     "--save-embeddings or PromptEmbeddings.save): the text encoders are not loaded")
    p.add_argument("--out", required=True, metavar="PATH", help="image file (.png/.jpg/.webp) for a single image, "
                   "otherwise a folder that receives 0000.png, 0001.png, ...")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 28, or 4 for a model without "
                   "guidance embedding, like FLUX.1-schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance scale (FLUX.1-dev; default 3.5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 16 (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 16 (default 1024)")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens per prompt (<= 512, default 512)")
    p.add_argument("--batch-size", type=int, default=1, help="images per denoising batch (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the text encoders and the transformer (default bfloat16; the VAE runs in float32)")
    p.add_argument("--components", metavar="FOLDER", help="diffusers FLUX pipeline folder providing tokenizers, "
                   "text encoders, VAE and scheduler when MODEL is a pqjax checkpoint (or another transformer-only "
                   "checkpoint pqjax.load_model reads)")
    p.add_argument("--save-embeddings", metavar="FILE", help="also write the prompt embeddings (.safetensors)")
    return p


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise CommandError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    if not prompts:
        raise CommandError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def _output_paths(out: str, n: int) -> list[str]:
    if out.lower().endswith(IMAGE_SUFFIXES):
        if n != 1:
            raise CommandError(f"--out {out} is a single image file but there are {n} prompts: give a folder")
        return [out]
    return [os.path.join(out, f"{i:04d}.png") for i in range(n)]


class ProgressBar:
    """``[#####-----] 14/28 steps  image 1-2/5  0.81 s/step`` on stderr, driven by the jitted loop's callback."""

    def __init__(self, total_images: int, width: int = 30, stream=None):
        self.total_images, self.width, self.stream = total_images, width, stream or sys.stderr
        self.images = (0, 0)
        self._t0 = self._last = None

    def start_batch(self, first: int, count: int) -> None:
        self.images = (first, first + count)
        self._t0 = time.perf_counter()

    def __call__(self, step: int, num_steps: int) -> None:
        now = time.perf_counter()
        rate = (now - self._t0) / max(step, 1) if self._t0 is not None else 0.0
        done = int(self.width * step / max(num_steps, 1))
        a, b = self.images
        imgs = f"image {a + 1}" + (f"-{b}" if b - a > 1 else "") + f"/{self.total_images}"
        end = "\n" if step == num_steps else ""
        print(f"\r[{'#' * done}{'-' * (self.width - done)}] {step}/{num_steps} steps  {imgs}  {rate:.2f} s/step",
              end=end, file=self.stream, flush=True)


def _is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def run(args) -> int:
    import jax.numpy as jnp

    import converters
    from pqjax.pipeline import (PromptEmbeddings, PromptTruncatedWarning, encode_prompts, latent_size,
                                text_to_image, to_pil)

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if not os.path.exists(args.model):
        raise CommandError(f"MODEL {args.model}: no such file or folder")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    try:
        latent_size(args.height, args.width)
    except ValueError as e:
        raise CommandError(str(e)) from None
    dtype = getattr(jnp, args.dtype)

    # -- what to load (configs now, weights lazily) --------------------------------------------------
    checkpoint_path = None
    if _is_pipeline_folder(args.model):
        folder = args.model
        if args.components:
            raise CommandError("--components is only for a pqjax checkpoint MODEL; MODEL is a pipeline folder")
    else:
        if not args.components:
            raise CommandError(f"{args.model} is not a diffusers pipeline folder (no model_index.json); for a pqjax "
                               "checkpoint give --components PIPELINE_FOLDER (tokenizers, text encoders, VAE)")
        folder, checkpoint_path = args.components, args.model
    encoders = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    wanted = [c for c in converters.pipeline_components.COMPONENTS
              if not (checkpoint_path and c == "transformer") and not (args.embeddings and c in encoders)]
    if args.embeddings:
        emb = PromptEmbeddings.load(args.embeddings)
        prompts = None
        say(f"loaded {len(emb)} prompt embeddings from {args.embeddings}")
    else:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    paths = _output_paths(args.out, len(emb) if prompts is None else len(prompts))
    pipe = converters.load_flux_pipeline(folder, dtype, components=wanted)

    # -- prompts -> embeddings; the encoders are released before the transformer is read --------------
    if prompts is not None:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            emb = encode_prompts(pipe, prompts, max_sequence_length=args.max_sequence_length,
                                 batch_size=args.batch_size, release=True)
        for w in caught:
            print(f"pqjax sample: warning: {w.message}", file=sys.stderr)
        say(f"encoded {len(prompts)} prompt(s) in {time.perf_counter() - t0:.1f} s")
        if args.save_embeddings:
            emb.save(args.save_embeddings)
            say(f"wrote prompt embeddings to {args.save_embeddings}")
    transformer = None
    if checkpoint_path:
        from pqjax.io import load_model
        ck = load_model(checkpoint_path, dtype=dtype)
        transformer = (ck.config, ck.params)
    config = transformer[0] if transformer is not None else pipe.transformer.config
    steps = args.steps or (28 if config.guidance_embeds else 4)

    # -- denoise + decode, batch by batch ------------------------------------------------------------------
    bar = None if args.quiet else ProgressBar(len(emb))
    for start in range(0, len(emb), args.batch_size):
        batch = emb[start:start + args.batch_size]
        if bar is not None:
            bar.start_batch(start, len(batch))
        images = text_to_image(pipe, embeddings=batch, transformer=transformer, num_inference_steps=steps,
                               guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                               first_index=start, callback=bar)
        for img, path in zip(to_pil(images), paths[start:start + len(batch)]):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            img.save(path)
            print(path)
    return 0
