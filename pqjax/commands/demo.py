"""`pqjax demo`: the README's main job, on the shipped demo model.

Loads the demo text-to-image model that ships inside the package (a small FLUX transformer trained on procedural
shapes by ``examples/train_demo_model.py``, stored as a diffusers folder and read through ``converters.load_flux``),
samples it on a few captions with the jitted flow-matching sampler, quantizes it with RTN / PermuQuant /
PermuQuant-H at NVFP4 and INT3, samples each quantized model on the same captions and noise, reads every image back
with the ShapeEval classifier, and writes a PNG grid (float | each variant) and a report.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time

from pqjax.commands import CommandError, options
from pqjax.commands.common import check_positive, out_folder, write_text

log = logging.getLogger("pqjax.commands")

DEFAULT_VARIANTS = ("nvfp4:rtn", "nvfp4:permuquant", "nvfp4:permuquant-h", "int3:rtn", "int3:permuquant",
                    "int3:permuquant-h")
DEFAULT_CAPTIONS = ("a red circle on the left", "two large blue squares", "a small yellow triangle at the top",
                    "a green square at the top and a purple circle at the bottom", "a large orange circle",
                    "a cyan triangle on the left and a pink square on the right")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="quantize and sample the shipped demo model; write a PNG grid and report",
                       description=__doc__)
    p.add_argument("--out", default="pqjax-demo", metavar="FOLDER", help="output folder (default: ./pqjax-demo)")
    options.add_overwrite(p, "the files in --out")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument("--captions", default=None,
                   help="';'-separated captions in the shapes grammar (default: six built-in ones), e.g. "
                        "'a red circle on the left;two green triangles'")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated format:method pairs (default: %(default)s); empty for float only")
    p.add_argument("--demo-model", default=None, metavar="FOLDER", help="demo model folder (default: the shipped one)")
    options.old_flag(p, "--model", "--demo-model", dest="demo_model")
    return p


def check_captions(captions: list[str]) -> None:
    """Raise CommandError naming the caption and word when a word is outside the demo model's vocabulary."""
    from pqjax.demo import MAX_CAPTION_WORDS, Tokenizer
    from pqjax.demo.tokenizer import split_words

    vocab = Tokenizer().vocab
    if not captions:
        raise CommandError("--captions: no captions given")
    for c in captions:
        words = split_words(c)
        unknown = [w for w in words if w not in vocab]
        if unknown:
            raise CommandError(f"--captions: {c!r}: word(s) {unknown} are not in the demo model's vocabulary "
                               f"({', '.join(w for w in vocab if not w.startswith('<'))})")
        if not words or len(words) > MAX_CAPTION_WORDS:
            raise CommandError(f"--captions: {c!r} has {len(words)} words; expected 1..{MAX_CAPTION_WORDS}")


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from pqjax.demo import assets, classifier
    from pqjax.demo import model as td
    from pqjax.demo.benchmark import calib_batch, parse_variants, quantize_demo, write_grid
    from pqjax.evaluate import psnr, relative_error
    from pqjax.formats import nbytes

    try:
        variants = parse_variants(args.variants)
    except ValueError as e:
        raise CommandError(str(e)) from None
    check_positive(args.steps, "--steps")
    out_folder(args.out, args.overwrite)
    captions = list(DEFAULT_CAPTIONS) if args.captions is None else [c.strip() for c in args.captions.split(";")
                                                                     if c.strip()]
    check_captions(captions)
    t_all = time.perf_counter()
    times = {}

    # 1. the shipped model (diffusers transformer folder + text encoder + tokenizer) and classifier
    t0 = time.perf_counter()
    try:
        state = assets.load_demo_model(args.demo_model)
        cls = assets.load_shapeeval()
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(str(e)) from None
    cfg = state.config.flux
    times["load model"] = time.perf_counter() - t0
    log.info("demo model (D=%d, %d double + %d single blocks, trained %d steps) from %s", cfg.inner_dim,
             cfg.num_layers, cfg.num_single_layers, int(state.step), args.demo_model or assets.DEMO_MODEL)

    def sample(transformer=None):
        lat = td.generate_latents(state, captions, seed=args.seed, steps=args.steps, transformer=transformer)
        return lat, td.tokens_to_image(jnp.asarray(lat))

    def read(images):
        return [_describe(a) for a in classifier.predict_attributes(cls, images)]

    t0 = time.perf_counter()
    ref_lat, ref_img = sample()
    times["float sample (incl. compile)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample()
    times["float sample (jitted)"] = time.perf_counter() - t0
    seen = {"float": read(ref_img)}

    # 2. quantize with each method, sample the same captions and noise
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = calib_batch(state, steps=args.steps) if variants else None
    columns, labels, rows = [ref_img], ["float"], []
    for v, fmt, method in variants:
        t0 = time.perf_counter()
        log.info("quantizing: %s ...", v)
        q, rep = quantize_demo(state, fmt, method, calib=calib, progress=not args.quiet)
        tq = time.perf_counter() - t0
        lat, img = sample(q)
        err = relative_error(lat, ref_lat)
        seen[v] = read(img)
        rows.append(dict(variant=v, latent_rel_err=err, psnr=psnr(img, ref_img, 255.0),
                         sum_site_E=sum(s.e_best for s in rep.sites), accepted=sum(s.accepted for s in rep.sites),
                         sites=len(rep.sites), param_bytes=int(nbytes(q)), quantize_s=tq))
        columns.append(img)
        labels.append(v.replace("permuquant", "PQ"))
        log.info("%-20s final-latent rel. error %.4f, PSNR %.2f dB (%d/%d permutations accepted, quantized in "
                 "%.1fs)", v, err, rows[-1]["psnr"], rows[-1]["accepted"], len(rep.sites), tq)

    # 3. outputs
    grid = out / "grid.png"
    write_grid(grid, columns, labels, row_labels=captions,
               metadata={"model": f"pqjax demo model ({args.demo_model or 'shipped'})", "seed": args.seed,
                         "steps": args.steps, "captions": json.dumps(captions), "columns": json.dumps(labels)})
    float_bytes = int(nbytes(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16),
                                          state.params["transformer"])))
    times["total"] = time.perf_counter() - t_all
    lines = ["# pqjax demo report", "",
             f"Shipped demo model (D={cfg.inner_dim}, 32x32 pixel space), {len(captions)} captions, {args.steps} "
             f"steps, noise seed {args.seed}; device {jax.devices()[0].device_kind}. Grid: {grid.name} (rows = "
             "captions, columns = float then each variant).", "",
             "| variant | final-latent rel. error vs float | PSNR vs float (dB) | sum of site E | permutations | "
             "param bytes (vs bf16) |",
             "|---|---|---|---|---|---|",
             f"| float (bf16 storage) | 0 | inf | - | - | {float_bytes} (1.00x) |"]
    for rw in rows:
        lines.append(f"| {rw['variant']} | {rw['latent_rel_err']:.4f} | {rw['psnr']:.2f} | {rw['sum_site_E']:.4g} | "
                     f"{rw['accepted']}/{rw['sites']} | {rw['param_bytes']} ({float_bytes / rw['param_bytes']:.2f}x "
                     "smaller) |")
    lines += ["", "What the ShapeEval classifier reads in each image:", "",
              "| caption | " + " | ".join(seen) + " |", "|---" * (len(seen) + 1) + "|"]
    for i, c in enumerate(captions):
        lines.append(f"| {c} | " + " | ".join(seen[k][i] for k in seen) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()), "",
              "The demo model keeps its embedders and final layer in 16 bits (default rules); they weigh more in a "
              "model this small, so its packed size ratio is below the FLUX.1-dev ratio of `pqjax bench --memory`. "
              "Full-scale ShapeEval numbers for every method: docs/RESULTS.md."]
    write_text(str(out / "report.md"), "\n".join(lines) + "\n")
    write_text(str(out / "report.json"), json.dumps(dict(captions=captions, variants=rows, read=seen, times=times,
                                                         float_bytes=float_bytes), indent=2))
    print("\n".join(lines))
    print(f"\nwrote {grid}, {out / 'report.md'}, {out / 'report.json'}")
    return 0


def _describe(attrs: dict) -> str:
    """Classifier output -> a short caption-like string ("red circle left + blue square right")."""
    return " + ".join(f"{o['size']} {o['color']} {o['shape']} {o['position']}" for o in attrs["objects"])
