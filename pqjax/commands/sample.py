"""``pqjax sample MODEL --prompt TEXT | --prompts FILE | --embeddings FILE ... --out PATH``: prompts to PNG images.

MODEL is a diffusers FLUX pipeline folder, or a pqjax checkpoint (its transformer, float or quantized) together with
``--components FOLDER``, the pipeline folder that supplies tokenizers, text encoders, VAE and scheduler. All prompts
are encoded first and the text encoders released before the transformer is loaded (peak memory = max(encoders,
transformer)). Image ``i`` (over all prompts) starts from ``prepare_latents(seed, ..., first_index=i)``, so images do
not depend on ``--batch-size``. Each PNG carries its prompt, seed, steps, guidance, size, model and method as text
metadata.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

from pqjax.commands import CommandError, options
from pqjax.commands.common import (check_positive, check_size, is_pipeline_folder, load_model, must_exist,
                                   read_prompts)

log = logging.getLogger("pqjax.commands")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="generate images from prompts (FLUX in JAX)",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL", help="diffusers FLUX pipeline folder, or a pqjax checkpoint "
                   "(then --components is required)")
    options.add_text_inputs(p, required=True)
    options.add_components(p, "diffusers FLUX pipeline folder providing tokenizers, text encoders, VAE and scheduler "
                              "when MODEL is a pqjax checkpoint (or another transformer-only checkpoint "
                              "pqjax.load_model reads)")
    p.add_argument("--out", required=True, metavar="PATH", help="image file (.png/.jpg/.webp) for a single image, "
                   "otherwise a folder that receives 0000.png, 0001.png, ...")
    options.add_overwrite(p, "existing images")
    options.add_sampling(p, size=1024, steps_help="denoising steps (default: 28, or 4 for a model without guidance "
                                                  "embedding, like FLUX.1-schnell)")
    p.add_argument("--batch-size", type=int, default=1, help="images per denoising batch (default 1)")
    options.add_dtype(p, "bfloat16", "dtype of the text encoders and the transformer (default bfloat16; not "
                                     "float16, in which T5 overflows; the VAE runs in float32)")
    p.add_argument("--save-embeddings", metavar="FILE", help="also write the prompt embeddings (.safetensors)")
    return p


def _output_paths(out: str, n: int, overwrite: bool) -> list[str]:
    if out.lower().endswith(IMAGE_SUFFIXES):
        if n != 1:
            raise CommandError(f"--out {out} is a single image file but there are {n} prompts: give a folder")
        paths = [out]
    else:
        paths = [os.path.join(out, f"{i:04d}.png") for i in range(n)]
    taken = [p for p in paths if os.path.exists(p)]
    if taken and not overwrite:
        raise CommandError(f"{taken[0]} already exists (use --overwrite to replace it)")
    return paths


def _metadata(args, prompt: str | None, index: int, steps: int, method: str):
    """PNG text chunks: what produced the image (``PIL.Image.open(f).text``)."""
    from PIL.PngImagePlugin import PngInfo

    from pqjax.version import __version__
    info = PngInfo()
    for k, v in {"prompt": prompt or "", "seed": args.seed, "image_index": index, "steps": steps,
                 "guidance": args.guidance, "size": f"{args.height}x{args.width}", "model": args.model,
                 "method": method, "software": f"pqjax {__version__}"}.items():
        info.add_text(k, str(v))
    return info


def run(args) -> int:
    import jax.numpy as jnp

    import converters
    from pqjax import progress
    from pqjax.pipeline import PromptEmbeddings, PromptTruncatedWarning, encode_prompts, text_to_image, to_pil

    must_exist(args.model, "MODEL ")
    check_positive(args.batch_size, "--batch-size")
    if args.steps is not None:
        check_positive(args.steps, "--steps")
    if args.dtype == "float16":
        raise CommandError("--dtype float16: T5 overflows in float16; use bfloat16 or float32")
    dtype = jnp.dtype(args.dtype)

    # -- what to load (configs now, weights lazily) --------------------------------------------------
    checkpoint_path = None
    if is_pipeline_folder(args.model):
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
        try:
            emb = PromptEmbeddings.load(args.embeddings)
        except (OSError, ValueError) as e:
            raise CommandError(str(e)) from None
        prompts = None
        log.info("loaded %d prompt embeddings from %s", len(emb), args.embeddings)
    else:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    pipe = converters.load_flux_pipeline(folder, dtype, components=wanted)
    check_size(args.height, args.width, vae_scale_factor=pipe.vae.config.scale_factor)
    paths = _output_paths(args.out, len(emb) if prompts is None else len(prompts), args.overwrite)

    # -- prompts -> embeddings; the encoders are released before the transformer is read --------------
    if prompts is not None:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            emb = encode_prompts(pipe, prompts, max_sequence_length=args.max_sequence_length,
                                 batch_size=args.batch_size, release=True)
        for w in caught:
            log.warning(str(w.message))
        log.info("encoded %d prompt(s) in %.1f s", len(prompts), time.perf_counter() - t0)
        if args.save_embeddings:
            emb.save(args.save_embeddings)
            log.info("wrote prompt embeddings to %s", args.save_embeddings)
    texts = prompts if prompts is not None else (emb.prompts or [None] * len(emb))
    transformer, method = None, "float"
    if checkpoint_path:
        ck = load_model(checkpoint_path, dtype=dtype)
        transformer = (ck.config, ck.params)
        if ck.quantized:
            method = f"{ck.kind} {getattr(ck.quant_config, 'method', '')}".strip()
    config = transformer[0] if transformer is not None else pipe.transformer.config
    steps = args.steps or (28 if config.guidance_embeds else 4)

    # -- denoise + decode, batch by batch ------------------------------------------------------------------
    for start in range(0, len(emb), args.batch_size):
        batch = emb[start:start + args.batch_size]
        a, b = start + 1, start + len(batch)
        label = f"image {a}" + (f"-{b}" if b > a else "") + f"/{len(emb)}"
        with progress.steps(label, enabled=not args.quiet, log=log):
            images = text_to_image(pipe, embeddings=batch, transformer=transformer, num_inference_steps=steps,
                                   guidance_scale=args.guidance, height=args.height, width=args.width,
                                   seed=args.seed, first_index=start, progress=True)
        for i, (img, path) in enumerate(zip(to_pil(images), paths[start:start + len(batch)])):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save = {"pnginfo": _metadata(args, texts[start + i], start + i, steps, method)} \
                if path.lower().endswith(".png") else {}
            img.save(path, **save)
            print(path)
    return 0
