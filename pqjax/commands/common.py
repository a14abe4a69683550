"""What several subcommands share: reading their inputs (models, prompts, embeddings, rules, the pipeline folder)
and writing their outputs (checkpoints, result folders). Each raises :class:`pqjax.cli.CommandError` with one line
naming the file or flag at fault."""
from __future__ import annotations

import json
import logging
import math
import os

from pqjax.commands import CommandError

log = logging.getLogger("pqjax.commands")

RANDOM_PROMPTS = 2
RANDOM_TOKENS = 64


# ---------------------------------------------------------------------------------------------- sizes, bytes

def human_count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"


def human_bytes(b: int) -> str:
    return f"{b / 2 ** 30:.3g} GiB" if b >= 2 ** 28 else f"{b / 2 ** 20:.3g} MiB"


def describe(config, params) -> str:
    import jax

    from pqjax.formats import QTensor, nbytes
    n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor)))
    return (f"FLUX {config.num_layers}+{config.num_single_layers} blocks, {human_count(n)} params, "
            f"{human_bytes(nbytes(params))}")


def check_size(height: int, width: int, flags: str = "--height/--width", vae_scale_factor: int = 8) -> None:
    from pqjax.pipeline import latent_size
    try:
        latent_size(height, width, vae_scale_factor)
    except ValueError as e:
        raise CommandError(f"{flags}: {e}") from None


def check_positive(value: int, flag: str) -> None:
    if value < 1:
        raise CommandError(f"{flag} must be >= 1, got {value}")


# ---------------------------------------------------------------------------------------------- inputs

def must_exist(path: str, what: str = "") -> None:
    if not os.path.exists(path):
        raise CommandError(f"{what}{path}: no such file or directory")


def read_prompts(path: str, flag: str = "--prompts") -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise CommandError(f"cannot read prompts file {path} ({flag}): {e.strerror or e}") from None
    if not prompts:
        raise CommandError(f"prompts file {path} ({flag}) has no prompts (one per line)")
    return prompts


def read_rules(path: str):
    from pqjax.config import Rule
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CommandError(f"--rules {path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CommandError(f"--rules {path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = data.get("rules")
    if not isinstance(data, list) or not data:
        raise CommandError(f"--rules {path}: expected a non-empty JSON list of [pattern, action(, on_indivisible)] "
                           "(or {\"rules\": [...]})")
    rules = []
    for i, r in enumerate(data):
        if isinstance(r, dict):
            r = [r.get("pattern"), r.get("action"), r.get("on_indivisible", "skip")]
        if not isinstance(r, (list, tuple)) or not 2 <= len(r) <= 3 or not all(isinstance(v, str) for v in r):
            raise CommandError(f"--rules {path}: rule {i} must be [pattern, action(, on_indivisible)] strings, "
                               f"got {r!r}")
        rules.append(Rule(*r))
    return tuple(rules)


def is_pipeline_folder(path: str | None) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, "model_index.json"))


def components_folder(components: str | None, model_path: str | None) -> str | None:
    """The diffusers pipeline folder that supplies tokenizers, text encoders, VAE and scheduler: ``--components``,
    else the model itself when it is a pipeline folder."""
    if components:
        if not is_pipeline_folder(components):
            raise CommandError(f"--components {components}: not a diffusers FLUX pipeline folder (no model_index.json)")
        return components
    return model_path if is_pipeline_folder(model_path) else None


def pipeline_settings(components: str | None):
    """``(scheduler_config or None, vae_scale_factor)`` the pipeline folder samples with (FLUX's VAE factor 8
    without one); configs only, no weights are read."""
    if components is None:
        return None, 8
    import converters
    parts = [c for c in ("vae", "scheduler") if os.path.isdir(os.path.join(components, c))]
    pipe = converters.load_flux_pipeline(components, components=parts)
    return pipe.scheduler_config, (pipe.vae.config.scale_factor if pipe.vae is not None else 8)


def default_scheduler(config):
    """Without a pipeline folder: FLUX.1-dev's schedule, FLUX.1-schnell's for a model without guidance embedding."""
    from pqjax.pipeline import FlowMatchConfig
    return FlowMatchConfig.flux_dev() if config.guidance_embeds else FlowMatchConfig.flux_schnell()


def text_inputs(args, config, *, components: str | None, dtype=None, seed: int = 0):
    """The prompt embeddings a command runs on -> ``(PromptEmbeddings, source)`` with source ``"embeddings"``,
    ``"prompts"`` or ``"random"``: ``--embeddings FILE``; ``--prompt`` / ``--prompts FILE`` encoded with the text
    encoders of ``components``; else (with a warning) seeded random embeddings."""
    import warnings

    import jax.numpy as jnp
    import numpy as np

    from pqjax.pipeline import PromptEmbeddings, PromptTruncatedWarning, encode_prompts
    if args.embeddings:
        if not os.path.isfile(args.embeddings):
            raise CommandError(f"--embeddings {args.embeddings}: no such file")
        try:
            emb = PromptEmbeddings.load(args.embeddings).check(config, origin=f"--embeddings {args.embeddings}")
        except ValueError as e:
            raise CommandError(str(e)) from None
        return emb.astype(jnp.float32 if dtype is None else dtype), "embeddings"
    if args.prompt is not None or args.prompts:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
        if components is None:
            raise CommandError("prompts need FLUX's tokenizers and text encoders: give --components PIPELINE_FOLDER "
                               "(a diffusers FLUX pipeline folder), or embeddings with --embeddings FILE")
        import converters
        pipe = converters.load_flux_pipeline(components, dtype or jnp.float32,
                                             components=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            emb = encode_prompts(pipe, prompts, max_sequence_length=args.max_sequence_length, release=True)
        for w in caught:
            log.warning(str(w.message))
        log.info("encoded %d prompt(s) with the text encoders of %s", len(prompts), components)
        try:
            return emb.check(config, origin=f"the text encoders of {components}"), "prompts"
        except ValueError as e:
            raise CommandError(str(e)) from None
    log.warning("no --prompt, --prompts or --embeddings given: using seeded random prompt embeddings (%d x %d "
                "tokens), which do not represent real prompts", RANDOM_PROMPTS, RANDOM_TOKENS)
    rng = np.random.default_rng(1_000_003 + seed)
    ctx = rng.standard_normal((RANDOM_PROMPTS, RANDOM_TOKENS, config.joint_attention_dim), np.float32)
    pooled = rng.standard_normal((RANDOM_PROMPTS, config.pooled_projection_dim), np.float32)
    emb = PromptEmbeddings(jnp.asarray(ctx), jnp.asarray(pooled))
    return (emb if dtype is None else emb.astype(dtype)), "random"


def load_model(path: str, **kw):
    """:func:`pqjax.load_model`, its errors as one line."""
    from pqjax.io import CheckpointError
    from pqjax.loading import load_model as load
    must_exist(path)
    try:
        return load(path, **kw)
    except CheckpointError as e:
        raise CommandError(str(e)) from None


# ---------------------------------------------------------------------------------------------- outputs

def refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise CommandError(f"{path} already exists (use --overwrite to replace it)")


def out_folder(path: str, overwrite: bool) -> str:
    """A results folder: refused when it exists and holds anything, unless ``overwrite`` (then its files are
    replaced one by one). Created only when the command writes."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise CommandError(f"{path} already exists and is not empty (use --overwrite to write into it)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{path} exists and is not a folder")
    return path


def write_text(path: str, text: str) -> None:
    """Write a whole text file at once (no half-written file if interrupted)."""
    from pqjax.io.atomic import atomic_write
    with atomic_write(path, overwrite=True) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_output(out: str, params, config, report=None, *, overwrite: bool = False) -> str:
    """Save to a pqjax checkpoint directory, or to one safetensors file when ``out`` ends in .safetensors."""
    import pqjax
    from pqjax.io import save_safetensors
    refuse_existing(out, overwrite)
    if out.endswith(".safetensors"):
        return save_safetensors(out, params, config, report, overwrite=overwrite)
    return pqjax.save(out, params, config, report, overwrite=overwrite)
