"""``pqjax eval FLOAT QUANT``: the quantized model against its float original on the same seeds and prompts.

``pqjax eval --shapeeval [MODEL ...]``: GenEval-style accuracy (``pqjax.demo.shapeeval``) of the shipped demo
model, float and each ``--variants`` quantization (and any MODEL: pqjax checkpoints of the demo transformer), with
the final-latent error and PSNR of each against float.
"""
from __future__ import annotations

import json
import os
import sys
import time

from pqjax.commands.convert import log
from pqjax.commands.quantize import check_size, components_folder, embeddings, parse_size


def add_parser(sub):
    p = sub.add_parser(
        "eval", help="compare a quantized model with its float original (latent error, PSNR, SSIM, per site)",
        description="Sample FLOAT and QUANT from the same noise seeds and prompt embeddings and report the final "
                    "latents' relative error, PSNR and SSIM of the quantized result against the float one (on "
                    "decoded images when a VAE is available, else on the unpacked latents; the output says which), "
                    "and each quantized site's output error. Writes JSON and a markdown table.")
    p.add_argument("float", metavar="FLOAT", nargs="?",
                   help="float model: pqjax checkpoint or FLUX weights (with --shapeeval: a MODEL, see there)")
    p.add_argument("quant", metavar="QUANT", nargs="?",
                   help="quantized model: pqjax checkpoint or pqjax .safetensors (with --shapeeval: a MODEL)")
    s = p.add_argument_group("ShapeEval (the shipped demo text-to-image model)")
    s.add_argument("--shapeeval", action="store_true",
                   help="score the demo model on ShapeEval (GenEval-style: single object, two objects, counting, "
                        "colors, position, color attribution): float, each --variants quantization, and the "
                        "MODELs given as positionals (pqjax checkpoints or weights of the demo transformer)")
    s.add_argument("--variants", default="",
                   help="comma-separated format:method pairs to quantize the demo model with and score, e.g. "
                        "nvfp4:rtn,nvfp4:permuquant (default: none)")
    s.add_argument("--per-task", type=int, default=50, help="prompts per ShapeEval task (default: 50)")
    s.add_argument("--demo-model", metavar="FOLDER", help="demo model folder (default: the shipped one)")
    s.add_argument("--classifier", metavar="FILE", help="ShapeEval classifier .npz (default: the shipped one)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (encoded with the text "
                                                     "encoders of --components)")
    g.add_argument("--embeds", metavar="FILE",
                   help="safetensors file with encoder_hidden_states [B,T,J] and pooled_projections [B,P]")
    p.add_argument("--components", metavar="FOLDER",
                   help="diffusers FLUX pipeline folder supplying the tokenizers + text encoders (--prompts), the VAE "
                        "(metrics on decoded images) and the scheduler (default: FLOAT when it is a pipeline folder)")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens per prompt (default: 512)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="SEED", help="noise seeds (default: 0 1)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 28; 20 with --shapeeval)")
    p.add_argument("--size", default="256", metavar="HxW", help="image size in pixels, N or HxW (default: 256)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="embedded guidance (default: 3.5)")
    p.add_argument("--no-sites", action="store_true", help="skip the per-site errors")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="JSON output (default: eval.json; shapeeval.json with --shapeeval)")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="markdown output (default: eval.md; shapeeval.md with --shapeeval)")
    return p


def run_shapeeval(args) -> int:
    import json as _json

    import jax.numpy as jnp

    from pqjax.io import CheckpointError, load_model
    from pqjax.cli import CommandError
    from pqjax.demo import assets, shapeeval
    from pqjax.demo import benchmark as B

    t0 = time.perf_counter()
    steps = 20 if args.steps is None else args.steps
    if steps < 1:
        raise CommandError(f"--steps must be >= 1, got {steps}")
    if args.per_task < 1:
        raise CommandError(f"--per-task must be >= 1, got {args.per_task}")
    if args.prompts or args.embeds or args.components:
        raise CommandError("--shapeeval uses its own prompts and the demo model's text encoder; drop "
                           "--prompts/--embeds/--components")
    try:
        variants = B.parse_variants(args.variants)
    except ValueError as e:
        raise CommandError(f"--variants: {e}") from None
    models = [m for m in (args.float, args.quant) if m is not None]
    for m in models:
        if not os.path.exists(m):
            raise CommandError(f"{m}: no such file or directory")
    try:
        state = assets.load_demo_model(args.demo_model)
        cls = assets.load_shapeeval(args.classifier)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(str(e)) from None
    loaded = []
    for m in models:
        try:
            ck = load_model(m, dtype=jnp.float32, expect_config=state.config.flux)
        except CheckpointError as e:
            raise CommandError(f"{e} (--shapeeval scores checkpoints of the demo model's transformer)") from None
        loaded.append((m, ck))

    items = shapeeval.prompts(args.per_task)
    seed = args.seeds[0]
    log(args, f"pqjax eval --shapeeval: {len(items)} prompts ({args.per_task} per task), {steps} steps, noise seed "
              f"{seed}; {1 + len(variants) + len(loaded)} model(s)")
    ceiling = shapeeval.generator_score(cls, items)
    ref = B.run_variant(state, cls, items, steps=steps, seed=seed, name="float")
    log(args, f"pqjax eval --shapeeval: float {100 * ref.overall:.1f}% ({ref.seconds:.1f} s)")
    results = [ref]
    calib = B.calib_batch(state, steps=steps) if variants else None
    for v, fmt, method in variants:
        q, _ = B.quantize_demo(state, fmt, method, calib=calib)
        results.append(B.run_variant(state, cls, items, transformer=q, steps=steps, seed=seed, reference=ref,
                                     name=v))
        log(args, f"pqjax eval --shapeeval: {v} {100 * results[-1].overall:.1f}%")
    for m, ck in loaded:
        results.append(B.run_variant(state, cls, items, transformer=ck.params, steps=steps, seed=seed,
                                     reference=ref, name=f"{m} ({ck.kind})"))
        log(args, f"pqjax eval --shapeeval: {m} {100 * results[-1].overall:.1f}%")

    md = "\n".join([f"# ShapeEval: {args.per_task} prompts per task, {steps} steps, noise seed {seed}", "",
                    f"Classifier on the generator's own renders of these prompts: {100 * ceiling['overall']:.1f}%.",
                    "", B.markdown_table(results), ""])
    json_path = args.json or "shapeeval.json"
    md_path = args.markdown or "shapeeval.md"
    with open(json_path, "w", encoding="utf-8") as f:
        _json.dump({"per_task": args.per_task, "steps": steps, "seed": seed, "ceiling": ceiling["tasks"],
                    "rows": [r.row() for r in results]}, f, indent=1)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    print(f"pqjax eval --shapeeval: float {100 * ref.overall:.1f}% overall; wrote {json_path} and {md_path} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def run(args) -> int:
    import jax.numpy as jnp

    from pqjax import evaluate
    from pqjax.io import config_diff, load_model
    from pqjax.cli import CommandError

    if args.shapeeval:
        return run_shapeeval(args)
    if args.float is None or args.quant is None:
        raise CommandError("pqjax eval needs FLOAT and QUANT (or --shapeeval)")
    if args.variants:
        raise CommandError("--variants is a --shapeeval option")
    args.steps = 28 if args.steps is None else args.steps
    args.json = args.json or "eval.json"
    args.markdown = args.markdown or "eval.md"
    t0 = time.perf_counter()
    for path in (args.float, args.quant):
        if not os.path.exists(path):
            raise CommandError(f"{path}: no such file or directory")
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    height, width = parse_size(args.size, "--size")
    check_size(height, width, "--size")
    log(args, f"pqjax eval: loading {args.quant} ...")
    qck = load_model(args.quant)
    if not qck.quantized:
        raise CommandError(f"{args.quant} is not a quantized model (it is {qck.kind}); give FLOAT then QUANT")
    log(args, f"pqjax eval: loading {args.float} ...")
    fck = load_model(args.float)
    if fck.config != qck.config:
        raise CommandError(f"{args.float} and {args.quant} are different models "
                           f"({config_diff(fck.config, qck.config)})")
    if fck.quantized:
        raise CommandError(f"{args.float} is quantized ({fck.kind}); FLOAT must be the float model")
    config = fck.config
    compute = jnp.asarray(fck.params["x_embedder"]["kernel"]).dtype
    _check_same_source(fck.params, qck.params, args)
    components = components_folder(args.components, args.float)
    ctx, pooled = embeddings(args, config, prompts=args.prompts, embeds=args.embeds,
                             flags=("--prompts", "--embeds"), seed=0, components=components, dtype=compute)
    perms = getattr(qck.report, "perms", None) if qck.report is not None else None
    per_site = not args.no_sites
    if per_site and perms is None:
        print("pqjax eval: warning: QUANT carries no quantization report with its permutations: per-site errors "
              "skipped", file=sys.stderr)
        per_site = False
    decode, sched = _pipeline_parts(components, height, width)
    log(args, f"pqjax eval: sampling {len(args.seeds)} seed(s) x {ctx.shape[0]} prompt(s), {args.steps} steps at "
              f"{height}x{width} ({'decoded images' if decode else 'latents: no VAE available'})")
    res = evaluate.compare(config, fck.params, qck.params, encoder_hidden_states=jnp.asarray(ctx, compute),
                           pooled_projections=jnp.asarray(pooled, compute), seeds=args.seeds,
                           num_inference_steps=args.steps, height=height, width=width,
                           guidance_scale=args.guidance_scale, dtype=compute, perms=perms, per_site=per_site,
                           decode=decode, scheduler_config=sched, progress=not args.quiet)
    qc = qck.quant_config
    res = {"float": args.float, "quant": args.quant, "format": qck.kind,
           "method": None if qc is None else qc.method, "embeddings": "file" if args.embeds else
           ("prompts" if args.prompts else "random"), **res}
    title = f"{qck.kind} {res['method'] or ''} vs float".replace("  ", " ")
    md = evaluate.markdown(res, title=title)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    with open(args.markdown, "w", encoding="utf-8") as f:
        f.write(md)
    if not args.quiet:
        print(evaluate.markdown(res, title=title, max_sites=12))
    m = res["mean"]
    print(f"{title}: latent rel. err {m['latent_rel_err']:.4f}, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} "
          f"({'images' if res['space'] == 'image' else 'latents'}); wrote {args.json} and {args.markdown} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _check_same_source(fparams, qparams, args) -> None:
    """Warn when QUANT's 16-bit embedders differ from FLOAT's: it was probably quantized from another model."""
    import numpy as np
    try:
        a = np.asarray(fparams["x_embedder"]["kernel"], np.float32)
        b = qparams["x_embedder"]["kernel"]
        if hasattr(b, "fmt"):
            return
        if a.shape == b.shape and not np.allclose(a, np.asarray(b, np.float32), rtol=1e-2, atol=1e-3):
            print(f"pqjax eval: warning: {args.quant} does not look quantized from {args.float} (their x_embedder "
                  "weights differ)", file=sys.stderr)
    except (KeyError, TypeError):
        pass


def _pipeline_parts(components: str | None, height: int, width: int):
    """(decode, scheduler_config) from the pipeline folder: its VAE (packed latents -> images in [0, 1]) and its
    scheduler config; (None, None) without a folder (metrics on latents, FLUX.1-dev's schedule)."""
    if components is None:
        return None, None
    import converters
    from pqjax.pipeline import decode_images
    parts = [c for c in ("vae", "scheduler") if os.path.isdir(os.path.join(components, c))]
    pipe = converters.load_flux_pipeline(components, components=parts)
    if pipe.vae is None:
        return None, pipe.scheduler_config
    return (lambda z: decode_images(pipe.vae.config, pipe.vae.params, z, height, width)), pipe.scheduler_config
