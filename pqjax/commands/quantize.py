"""``pqjax quantize SRC OUT``: calibrate, search permutations, absorb, pack -> a quantized pqjax checkpoint.

Also home of the calibration-input helpers ``pqjax eval`` shares (prompt files, embedding files, random embeddings).
"""
from __future__ import annotations

import json
import os
import sys
import time

from pqjax.commands.convert import DTYPES, describe, human_bytes, log, write_output

RANDOM_PROMPTS = 2
RANDOM_TOKENS = 64


def add_parser(sub):
    from pqjax.config import METHODS
    from pqjax.formats import FORMATS
    from pqjax.permute import DEFAULT_ALPHA_GRID

    p = sub.add_parser(
        "quantize", help="quantize a FLUX model (PermuQuant or a baseline) -> quantized checkpoint",
        description="Calibrate a float FLUX model along its sampler trajectory, search channel permutations "
                    "(PermuQuant) or apply a baseline, and write the packed W4A4 model to OUT (a pqjax checkpoint "
                    "directory, or FILE.safetensors). Prints the per-site report summary.")
    p.add_argument("src", metavar="SRC", help="float model: pqjax checkpoint, or FLUX weights in any layout "
                                               "`pqjax convert` reads")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (or FILE.safetensors)")
    p.add_argument("--format", choices=FORMATS, default="nvfp4", help="quantization format (default: nvfp4)")
    p.add_argument("--method", choices=METHODS, default="permuquant", help="method (default: permuquant)")
    p.add_argument("--group-size", type=int, help="INT group size along K: 32, 64 (default) or 128; nvfp4 is 16")
    p.add_argument("--alpha-grid", metavar="A,B,...",
                   help="PermuQuant score exponents searched per site (default: "
                        + ",".join(f"{a:g}" for a in DEFAULT_ALPHA_GRID) + ")")
    p.add_argument("--tau", type=float, default=0.0, help="acceptance threshold on the relative error gain "
                                                          "(default: 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calib-prompts", metavar="FILE", help="text file, one calibration prompt per line (encoded "
                                                            "with the text encoders of --components)")
    g.add_argument("--calib-embeds", metavar="FILE",
                   help="safetensors file with encoder_hidden_states [B,T,J] and pooled_projections [B,P]")
    p.add_argument("--components", metavar="FOLDER",
                   help="diffusers FLUX pipeline folder whose tokenizers and text encoders encode --calib-prompts "
                        "(default: SRC when SRC is a pipeline folder)")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens per prompt (default: 512)")
    p.add_argument("--calib-steps", type=int, default=4, help="sampler steps calibrated on (default: 4)")
    p.add_argument("--calib-size", default="256", metavar="HxW",
                   help="calibration image size in pixels, N or HxW (default: 256)")
    p.add_argument("--calib-rows", type=int, default=256, help="activation rows sampled per site (default: 256)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="embedded guidance (FLUX.1-dev; default 3.5)")
    p.add_argument("--seed", type=int, default=0, help="calibration noise / row sampling seed (default: 0)")
    p.add_argument("--rules", metavar="FILE",
                   help="JSON list of [pattern, action(, on_indivisible)] rules (regex on module paths, first "
                        "match wins; actions w4a4, w4a16, keep); default: DESIGN.md's rules")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype to load float weights in (default: as stored; "
                                                            "bf16 for FLUX weight files)")
    p.add_argument("--report", metavar="FILE", help="also write the per-site report as JSON")
    p.add_argument("--table", action="store_true", help="print the per-site table, not just the summary")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


# ---------------------------------------------------------------------------------------------- shared helpers

def parse_size(s: str, flag: str) -> tuple[int, int]:
    from pqjax.cli import CommandError
    try:
        parts = [int(v) for v in str(s).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise CommandError(f"{flag} must be N or HxW in pixels, got {s!r}")
    return parts[0], parts[1]


def check_size(height: int, width: int, flag: str) -> None:
    from pqjax.cli import CommandError
    from pqjax.pipeline import latent_size
    try:
        latent_size(height, width)
    except ValueError as e:
        raise CommandError(f"{flag}: {e}") from None


def read_embeddings(path: str, config, flag: str):
    """(encoder_hidden_states [B,T,J], pooled_projections [B,P]) as float32 numpy from a prompt-embeddings file
    (:meth:`pqjax.pipeline.PromptEmbeddings.load`: ``pqjax sample --save-embeddings`` or tensors named
    ``encoder_hidden_states`` + ``pooled_projections``), checked against ``config``."""
    import numpy as np

    from pqjax.cli import CommandError
    from pqjax.pipeline import PromptEmbeddings
    if not os.path.isfile(path):
        raise CommandError(f"{flag} {path}: no such file")
    try:
        emb = PromptEmbeddings.load(path).check(config, origin=f"{flag} {path}")
    except ValueError as e:
        raise CommandError(str(e)) from None
    return np.asarray(emb.prompt_embeds, np.float32), np.asarray(emb.pooled_prompt_embeds, np.float32)


def components_folder(components: str | None, model_path: str) -> str | None:
    """The diffusers pipeline folder that supplies tokenizers, text encoders and VAE: ``--components``, else the
    model itself when it is a pipeline folder."""
    from pqjax.cli import CommandError
    if components:
        if not os.path.isfile(os.path.join(components, "model_index.json")):
            raise CommandError(f"--components {components}: not a diffusers FLUX pipeline folder (no model_index.json)")
        return components
    if os.path.isfile(os.path.join(model_path, "model_index.json")):
        return model_path
    return None


def prompt_embeddings(path: str, config, flag: str, components: str | None, dtype, max_sequence_length: int,
                      quiet: bool = False):
    """Encode a prompt file (one prompt per line) with the pipeline folder's CLIP and T5 (``pqjax.pipeline``)."""
    import warnings

    import numpy as np

    import converters
    from pqjax.cli import CommandError
    from pqjax.pipeline import PromptTruncatedWarning, encode_prompts
    if not os.path.isfile(path):
        raise CommandError(f"{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = [ln.strip() for ln in f if ln.strip()]
    if not prompts:
        raise CommandError(f"{flag} {path}: no prompts (one per line)")
    if components is None:
        raise CommandError(f"{flag} needs FLUX's tokenizers and text encoders: give --components PIPELINE_FOLDER "
                           "(a diffusers FLUX pipeline folder), or embeddings with --calib-embeds/--embeds FILE")
    pipe = converters.load_flux_pipeline(components, dtype,
                                         components=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        emb = encode_prompts(pipe, prompts, max_sequence_length=max_sequence_length, release=True)
    for w in caught:
        print(f"pqjax: warning: {w.message}", file=sys.stderr)
    if not quiet:
        print(f"pqjax: encoded {len(prompts)} prompt(s) from {path} with the text encoders of {components}",
              file=sys.stderr)
    ctx = np.asarray(emb.prompt_embeds, np.float32)
    pooled = np.asarray(emb.pooled_prompt_embeds, np.float32)
    if ctx.shape[-1] != config.joint_attention_dim or pooled.shape[-1] != config.pooled_projection_dim:
        raise CommandError(f"the text encoders of {components} give [{ctx.shape[-1]}], [{pooled.shape[-1]}]-dim "
                           f"embeddings but the model expects {config.joint_attention_dim} and "
                           f"{config.pooled_projection_dim}")
    return ctx, pooled


def random_embeddings(config, seed: int, n: int = RANDOM_PROMPTS, tokens: int = RANDOM_TOKENS):
    import numpy as np
    rng = np.random.default_rng(1_000_003 + seed)
    return (rng.standard_normal((n, tokens, config.joint_attention_dim), np.float32),
            rng.standard_normal((n, config.pooled_projection_dim), np.float32))


def embeddings(args, config, *, prompts: str | None, embeds: str | None, flags: tuple[str, str], seed: int,
               components: str | None = None, dtype=None):
    """Prompt embeddings from an embeddings file, a prompt file (text encoders of ``components``), or, with a
    warning, seeded random ones."""
    if embeds:
        return read_embeddings(embeds, config, flags[1])
    if prompts:
        return prompt_embeddings(prompts, config, flags[0], components, dtype, args.max_sequence_length,
                                 quiet=args.quiet)
    print(f"pqjax {args.command}: warning: no {flags[0]} or {flags[1]} given: using seeded random prompt "
          f"embeddings ({RANDOM_PROMPTS} x {RANDOM_TOKENS} tokens), which do not represent real prompts",
          file=sys.stderr, flush=True)
    return random_embeddings(config, seed)


def read_rules(path: str):
    from pqjax.cli import CommandError
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


# ---------------------------------------------------------------------------------------------- run

def run(args) -> int:
    import jax.numpy as jnp

    import pqjax
    from pqjax.calib import CalibBatch
    from pqjax.io import load_model
    from pqjax.cli import CommandError
    from pqjax.formats import nbytes

    t0 = time.perf_counter()
    if not os.path.exists(args.src):
        raise CommandError(f"{args.src}: no such file or directory")
    if os.path.exists(args.out) and not args.overwrite:
        raise CommandError(f"{args.out} already exists (use --overwrite to replace it)")
    if args.calib_steps < 1:
        raise CommandError(f"--calib-steps must be >= 1, got {args.calib_steps}")
    height, width = parse_size(args.calib_size, "--calib-size")
    check_size(height, width, "--calib-size")
    kw = {}
    if args.alpha_grid:
        try:
            kw["alpha_grid"] = tuple(float(a) for a in args.alpha_grid.split(","))
        except ValueError:
            raise CommandError(f"--alpha-grid must be comma-separated numbers, got {args.alpha_grid!r}") from None
    if args.rules:
        kw["rules"] = read_rules(args.rules)
    qc = pqjax.QuantConfig(format=args.format, method=args.method, group_size=args.group_size, tau=args.tau,
                           calib_rows=args.calib_rows, calib_seed=args.seed, **kw)   # ValueError -> exit 1

    log(args, f"pqjax quantize: loading {args.src} ...")
    dtype = None if args.dtype is None else jnp.dtype(DTYPES[args.dtype])
    ck = load_model(args.src, dtype=dtype)
    if ck.quantized:
        raise CommandError(f"{args.src} is already quantized ({ck.kind}); quantize its float original")
    config, params = ck.config, ck.params
    compute = jnp.asarray(params["x_embedder"]["kernel"]).dtype
    ctx, pooled = embeddings(args, config, prompts=args.calib_prompts, embeds=args.calib_embeds,
                             flags=("--calib-prompts", "--calib-embeds"), seed=args.seed,
                             components=components_folder(args.components, args.src), dtype=compute)
    batch = CalibBatch(encoder_hidden_states=jnp.asarray(ctx, compute), pooled_projections=jnp.asarray(pooled, compute),
                       height=height, width=width, num_inference_steps=args.calib_steps,
                       guidance_scale=args.guidance_scale, seed=args.seed)
    log(args, f"pqjax quantize: {args.method} {args.format} on {describe(config, params)}; calibrating on "
              f"{ctx.shape[0]} prompt(s) x {args.calib_steps} steps at {height}x{width}")
    qparams, report = pqjax.quantize(params, batch, config=qc, model_config=config, progress=not args.quiet)
    log(args, f"pqjax quantize: writing {args.out} ...")
    path = write_output(args.out, qparams, config, report, overwrite=args.overwrite)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1)
    if args.table:
        print(report.table())
    print(report.summary())
    src_b, q_b = nbytes(params), nbytes(qparams)
    print(f"wrote {path}: {human_bytes(q_b)} ({src_b / q_b:.2f}x smaller than the "
          f"{jnp.dtype(compute).name} source) in {time.perf_counter() - t0:.1f} s")
    return 0
