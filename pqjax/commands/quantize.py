"""``pqjax quantize SRC OUT``: calibrate, search permutations, absorb, pack -> a quantized pqjax checkpoint.

Calibration runs the float model on the trajectory ``pqjax sample`` would visit: the pipeline folder's scheduler
(``--components``, or SRC itself when it is a pipeline folder) and the sampler's defaults (1024x1024, 28 steps;
4 for a model without guidance embedding), on the given prompts or embeddings.
"""
from __future__ import annotations

import json
import logging
import time

from pqjax.commands import CommandError, options
from pqjax.commands.common import (check_positive, check_size, components_folder, default_scheduler, describe,
                                   human_bytes, load_model, must_exist, pipeline_settings, read_rules, refuse_existing, text_inputs,
                                   write_output, write_text)

log = logging.getLogger("pqjax.commands")


def add_parser(sub):
    from pqjax.permute import DEFAULT_ALPHA_GRID

    p = sub.add_parser(
        "quantize", help="quantize a FLUX model (PermuQuant or a baseline) -> quantized checkpoint",
        description="Calibrate a float FLUX model along its sampler trajectory, search channel permutations "
                    "(PermuQuant) or apply a baseline, and write the packed W4A4 model to OUT (a pqjax checkpoint "
                    "directory, or FILE.safetensors). Prints the per-site report summary.")
    p.add_argument("src", metavar="SRC", help="float model: pqjax checkpoint, or FLUX weights in any layout "
                                               "`pqjax convert` reads")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (or FILE.safetensors)")
    options.add_quantization(p)
    p.add_argument("--alpha-grid", metavar="A,B,...",
                   help="PermuQuant score exponents searched per site (default: "
                        + ",".join(f"{a:g}" for a in DEFAULT_ALPHA_GRID) + ")")
    p.add_argument("--tau", type=float, default=0.0, help="acceptance threshold on the relative error gain "
                                                          "(default: 0)")
    g = options.add_text_inputs(p, what="calibration prompts")
    options.add_components(p, "diffusers FLUX pipeline folder whose text encoders encode the prompts and whose "
                              "scheduler (and VAE factor) calibration follows (default: SRC when it is one)")
    options.add_sampling(p, size=1024, seed_help="calibration noise / row sampling seed (default 0)",
                         steps_help="sampler steps calibrated on (default: 28, or 4 for a model without guidance "
                                    "embedding, as `pqjax sample`)")
    options.old_flag(g, "--calib-prompts", "--prompts", dest="prompts")
    options.old_flag(g, "--calib-embeds", "--embeddings", dest="embeddings")
    options.old_flag(p, "--calib-steps", "--steps", dest="steps", type=int)
    options.old_flag(p, "--calib-size", "--height and --width", dest="height",
                     convert=lambda v, parser, flag: dict(zip(("height", "width"),
                                                              options.parse_size(v, parser, flag))))
    p.add_argument("--calib-rows", type=int, default=256, help="activation rows sampled per site (default: 256)")
    options.add_dtype(p, None, "dtype to load float weights in (default: as stored; bfloat16 for FLUX weight files)")
    p.add_argument("--report", metavar="FILE", help="also write the per-site report as JSON")
    p.add_argument("--table", action="store_true", help="print the per-site table, not just the summary")
    options.add_overwrite(p)
    return p


def run(args) -> int:
    import jax.numpy as jnp

    import pqjax
    from pqjax.calib import CalibBatch
    from pqjax.formats import nbytes

    t0 = time.perf_counter()
    must_exist(args.src)
    refuse_existing(args.out, args.overwrite)
    if args.steps is not None:
        check_positive(args.steps, "--steps")
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
    components = components_folder(args.components, args.src)
    scheduler, vae_factor = pipeline_settings(components)
    check_size(args.height, args.width, vae_scale_factor=vae_factor)

    log.info("loading %s ...", args.src)
    ck = load_model(args.src, dtype=None if args.dtype is None else jnp.dtype(args.dtype))
    if ck.quantized:
        raise CommandError(f"{args.src} is already quantized ({ck.kind}); quantize its float original")
    config, params = ck.config, ck.params
    scheduler = scheduler or default_scheduler(config)
    compute = jnp.asarray(params["x_embedder"]["kernel"]).dtype
    emb, _ = text_inputs(args, config, components=components, dtype=compute, seed=args.seed)
    batch = CalibBatch(encoder_hidden_states=emb.prompt_embeds, pooled_projections=emb.pooled_prompt_embeds,
                       height=args.height, width=args.width, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, seed=args.seed, scheduler_config=scheduler,
                       vae_scale_factor=vae_factor)
    log.info("%s %s on %s; calibrating on %d prompt(s) x %d steps at %dx%d%s", args.method, args.format,
             describe(config, params), len(emb), batch.steps_for(config), args.height, args.width,
             f" with the scheduler of {components}" if components else "")
    qparams, report = pqjax.quantize(params, batch, config=qc, model_config=config, progress=not args.quiet)
    log.info("writing %s ...", args.out)
    path = write_output(args.out, qparams, config, report, overwrite=args.overwrite)
    if args.report:
        write_text(args.report, json.dumps(report.to_dict(), indent=1))
    if args.table:
        print(report.table())
    print(report.summary())
    src_b, q_b = nbytes(params), nbytes(qparams)
    print(f"wrote {path}: {human_bytes(q_b)} ({src_b / q_b:.2f}x smaller than the "
          f"{jnp.dtype(compute).name} source) in {time.perf_counter() - t0:.1f} s")
    return 0
