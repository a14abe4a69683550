"""``pqjax eval FLOAT QUANT``: the quantized model against its float original on the same seeds and prompts.

``pqjax eval --shapeeval [MODEL ...]``: GenEval-style accuracy (``pqjax.demo.shapeeval``) of the shipped demo
model, float and each ``--variants`` quantization (and any MODEL: pqjax checkpoints of the demo transformer), with
the final-latent error and PSNR of each against float.

Results go to the ``--out`` folder (``eval.json`` + ``eval.md``, or ``shapeeval.json`` + ``shapeeval.md``), which is
not overwritten without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

from pqjax.commands import CommandError, options
from pqjax.commands.common import (check_positive, check_size, components_folder, load_model, must_exist,
                                   out_folder, text_inputs, write_text)

log = logging.getLogger("pqjax.commands")
DEFAULT_OUT = "pqjax-eval"


def add_parser(sub):
    p = sub.add_parser(
        "eval", help="compare a quantized model with its float original (latent error, PSNR, SSIM, per site)",
        description="Sample FLOAT and QUANT from the same noise seeds and prompt embeddings and report the final "
                    "latents' relative error, PSNR and SSIM of the quantized result against the float one (on "
                    "decoded images when a VAE is available, else on the unpacked latents; the output says which), "
                    "and each quantized site's output error. Writes eval.json and eval.md into --out.")
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
    g = options.add_text_inputs(p)
    options.old_flag(g, "--embeds", "--embeddings", dest="embeddings")
    options.add_components(p, "diffusers FLUX pipeline folder supplying the tokenizers + text encoders (prompts), "
                              "the VAE (metrics on decoded images) and the scheduler (default: FLOAT when it is one)")
    options.add_sampling(p, size=256, several_seeds=True, seed_help="noise seeds (default: 0 1)",
                         steps_help="sampler steps (default: 28; 20 with --shapeeval)")
    p.add_argument("--no-sites", action="store_true", help="skip the per-site errors")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="FOLDER",
                   help=f"folder for the JSON and markdown results (default: ./{DEFAULT_OUT})")
    options.add_overwrite(p, "the results in --out")
    p.add_argument("--json", nargs="?", const=True, default=False, metavar="FILE",
                   help="print the results as one JSON object on stdout (instead of the tables)")
    p.add_argument("--markdown", default=None, help=argparse.SUPPRESS)
    return p


def _outputs(args, stem: str) -> tuple[str, str]:
    """The JSON and markdown paths; the old ``--json FILE`` / ``--markdown FILE`` spellings still name files."""
    out_folder(args.out, args.overwrite)
    json_path, md_path = os.path.join(args.out, f"{stem}.json"), os.path.join(args.out, f"{stem}.md")
    if isinstance(args.json, str):
        log.warning("--json FILE is deprecated and will be removed in the next version; use --out FOLDER (--json "
                    "alone prints the JSON)")
        json_path, args.json = args.json, False
    if args.markdown:
        log.warning("--markdown FILE is deprecated and will be removed in the next version; use --out FOLDER")
        md_path = args.markdown
    return json_path, md_path


def _write(json_path: str, md_path: str, res: dict, md: str) -> None:
    for path in (json_path, md_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(json_path, json.dumps(res, indent=1))
    write_text(md_path, md)


def run_shapeeval(args) -> int:
    import jax.numpy as jnp

    from pqjax.demo import assets, shapeeval
    from pqjax.demo import benchmark as B
    from pqjax.io import CheckpointError
    from pqjax.loading import load_model as load

    t0 = time.perf_counter()
    steps = 20 if args.steps is None else args.steps
    check_positive(steps, "--steps")
    check_positive(args.per_task, "--per-task")
    if args.prompt is not None or args.prompts or args.embeddings or args.components:
        raise CommandError("--shapeeval uses its own prompts and the demo model's text encoder; drop "
                           "--prompt/--prompts/--embeddings/--components")
    try:
        variants = B.parse_variants(args.variants)
    except ValueError as e:
        raise CommandError(f"--variants: {e}") from None
    models = [m for m in (args.float, args.quant) if m is not None]
    for m in models:
        must_exist(m)
    json_path, md_path = _outputs(args, "shapeeval")
    try:
        model = assets.load_demo_model(args.demo_model)
        cls = assets.load_shapeeval(args.classifier)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(str(e)) from None
    loaded = []
    for m in models:
        try:
            ck = load(m, dtype=jnp.float32, expect_config=model.config.flux)
        except CheckpointError as e:
            raise CommandError(f"{e} (--shapeeval scores checkpoints of the demo model's transformer)") from None
        loaded.append((m, ck))

    items = shapeeval.prompts(args.per_task)
    seed = args.seed[0]
    log.info("%d prompts (%d per task), %d steps, noise seed %d; %d model(s)", len(items), args.per_task, steps, seed,
             1 + len(variants) + len(loaded))
    ceiling = shapeeval.generator_score(cls, items)
    ref = B.run_variant(model, cls, items, steps=steps, seed=seed, name="float")
    log.info("float %.1f%% (%.1f s)", 100 * ref.overall, ref.seconds)
    results = [ref]
    calib = B.calib_batch(model, steps=steps) if variants else None
    for v, fmt, method in variants:
        log.info("quantizing the demo model: %s ...", v)
        q, _ = B.quantize_demo(model, fmt, method, calib=calib, progress=not args.quiet)
        results.append(B.run_variant(model, cls, items, transformer=q, steps=steps, seed=seed, reference=ref, name=v))
        log.info("%s %.1f%%", v, 100 * results[-1].overall)
    for m, ck in loaded:
        results.append(B.run_variant(model, cls, items, transformer=ck.params, steps=steps, seed=seed,
                                     reference=ref, name=f"{m} ({ck.kind})"))
        log.info("%s %.1f%%", m, 100 * results[-1].overall)

    md = "\n".join([f"# ShapeEval: {args.per_task} prompts per task, {steps} steps, noise seed {seed}", "",
                    f"Classifier on the generator's own renders of these prompts: {100 * ceiling['overall']:.1f}%.",
                    "", B.markdown_table(results), ""])
    res = {"per_task": args.per_task, "steps": steps, "seed": seed, "ceiling": ceiling["tasks"],
           "rows": [r.row() for r in results]}
    _write(json_path, md_path, res, md)
    print(json.dumps(res) if args.json else md)
    log.info("float %.1f%% overall; wrote %s and %s in %.1f s", 100 * ref.overall, json_path, md_path,
             time.perf_counter() - t0)
    return 0


def run(args) -> int:
    import jax.numpy as jnp

    from pqjax import evaluate
    from pqjax.io import config_diff

    if args.shapeeval:
        return run_shapeeval(args)
    if args.float is None or args.quant is None:
        raise CommandError("pqjax eval needs FLOAT and QUANT (or --shapeeval)")
    if args.variants:
        raise CommandError("--variants is a --shapeeval option")
    steps = 28 if args.steps is None else args.steps
    t0 = time.perf_counter()
    for path in (args.float, args.quant):
        must_exist(path)
    check_positive(steps, "--steps")
    json_path, md_path = _outputs(args, "eval")
    components = components_folder(args.components, args.float)
    decode, sched, vae_factor = _pipeline_parts(components, args.height, args.width)
    check_size(args.height, args.width, vae_scale_factor=vae_factor)
    log.info("loading %s ...", args.quant)
    qck = load_model(args.quant)
    if not qck.quantized:
        raise CommandError(f"{args.quant} is not a quantized model (it is {qck.kind}); give FLOAT then QUANT")
    log.info("loading %s ...", args.float)
    fck = load_model(args.float)
    if fck.config != qck.config:
        raise CommandError(f"{args.float} and {args.quant} are different models "
                           f"({config_diff(fck.config, qck.config)})")
    if fck.quantized:
        raise CommandError(f"{args.float} is quantized ({fck.kind}); FLOAT must be the float model")
    config = fck.config
    compute = jnp.asarray(fck.params["x_embedder"]["kernel"]).dtype
    _check_same_source(fck.params, qck.params, args)
    emb, source = text_inputs(args, config, components=components, dtype=compute)
    perms = getattr(qck.report, "perms", None) if qck.report is not None else None
    per_site = not args.no_sites
    if per_site and perms is None:
        log.warning("QUANT carries no quantization report with its permutations: per-site errors skipped")
        per_site = False
    log.info("sampling %d seed(s) x %d prompt(s), %d steps at %dx%d (%s)", len(args.seed), len(emb), steps,
             args.height, args.width, "decoded images" if decode else "latents: no VAE available")
    res = evaluate.compare(config, fck.params, qck.params, encoder_hidden_states=emb.prompt_embeds,
                           pooled_projections=emb.pooled_prompt_embeds, seeds=args.seed, num_inference_steps=steps,
                           height=args.height, width=args.width, guidance_scale=args.guidance, dtype=compute,
                           perms=perms, per_site=per_site, decode=decode, scheduler_config=sched,
                           vae_scale_factor=vae_factor, prompts=emb.prompts, progress=not args.quiet)
    qc = qck.quant_config
    res = {"float": args.float, "quant": args.quant, "format": qck.kind,
           "method": None if qc is None else qc.method, "embeddings": source, **res}
    title = f"{qck.kind} {res['method'] or ''} vs float".replace("  ", " ")
    _write(json_path, md_path, res, evaluate.markdown(res, title=title))
    if args.json:
        print(json.dumps(res))
        return 0
    if not args.quiet:
        print(evaluate.markdown(res, title=title, max_sites=12))
    m = res["mean"]
    print(f"{title}: latent rel. err {m['latent_rel_err']:.4f}, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} "
          f"({'images' if res['space'] == 'image' else 'latents'}); wrote {json_path} and {md_path} in "
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
            log.warning("%s does not look quantized from %s (their x_embedder weights differ)", args.quant,
                        args.float)
    except (KeyError, TypeError):
        pass


def _pipeline_parts(components: str | None, height: int, width: int):
    """(decode, scheduler_config, vae_scale_factor) from the pipeline folder: its VAE (packed latents -> images in
    [0, 1]) and scheduler; (None, None, 8) without a folder (metrics on latents, FLUX.1-dev's schedule)."""
    if components is None:
        return None, None, 8
    import converters
    from pqjax.pipeline import decode_images
    parts = [c for c in ("vae", "scheduler") if os.path.isdir(os.path.join(components, c))]
    pipe = converters.load_flux_pipeline(components, components=parts)
    if pipe.vae is None:
        return None, pipe.scheduler_config, 8
    return ((lambda z: decode_images(pipe.vae.config, pipe.vae.params, z, height, width)), pipe.scheduler_config,
            pipe.vae.config.scale_factor)
