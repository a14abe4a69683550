"""Quality of every method x format on a synthetic FLUX with realistic channel statistics -> docs/QUALITY.md.

    python examples/quality_table.py [--heads 4] [--layers 2] [--single 2] [--out docs/QUALITY.md]

The model is ``pqjax.models.synthetic.outlier_params`` (massive residual channels, log-normal per-channel scales,
heavy-tailed adaLN modulation, Student-t weights; see that module for why it stands in for FLUX). Calibration uses
one set of random prompt embeddings; evaluation uses another (held-out prompts, fresh noise), sampled with the same
jitted sampler. Reported: final-latent relative L2 error vs the float model, one-step forward error, and the summed
per-site calibration error E of the searched methods against RTN.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import jax.numpy as jnp
import numpy as np

import pqjax
from pqjax import QuantConfig
from pqjax.models import synthetic
from pqjax.models.flux import FluxConfig
from pqjax.pipeline import sample

METHODS = ("rtn", "smoothquant", "hadamard", "permuquant", "permuquant-h")
FORMATS = ("nvfp4", "int4", "int3")


def _embeds(seed, n, cfg):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal((n, 16, cfg.joint_attention_dim)), jnp.float32),
            jnp.asarray(r.standard_normal((n, cfg.pooled_projection_dim)), jnp.float32))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (latent tokens = (size/16)^2)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--calib-prompts", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=4)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="docs/QUALITY.md")
    args = ap.parse_args(argv)
    cfg = FluxConfig.tiny(num_attention_heads=args.heads, num_layers=args.layers, num_single_layers=args.single)
    params = synthetic.outlier_params(cfg, seed=0)
    ctx, pooled = _embeds(1, args.calib_prompts, cfg)
    calib = pqjax.CalibBatch(ctx, pooled, height=args.size, width=args.size, num_inference_steps=args.steps, seed=1)
    ectx, epooled = _embeds(2, args.eval_prompts, cfg)
    n_img = (args.size // 16) ** 2
    lat = jnp.asarray(np.random.default_rng(3).standard_normal((args.eval_prompts, n_img, cfg.in_channels)), jnp.float32)

    def run(p):
        return np.asarray(sample(cfg, p, latents=lat, encoder_hidden_states=ectx, pooled_projections=epooled,
                                 num_inference_steps=args.steps, height=args.size, width=args.size))

    ref = run(params)
    rows, per_site = [], {}
    for fmt in args.formats.split(","):
        base_e = None
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            q, rep = pqjax.quantize(params, calib, config=QuantConfig(format=fmt, method=method), model_config=cfg,
                                    progress=False)
            secs = time.perf_counter() - t0
            out = run(q)
            per_site[(fmt, method)] = {r.site: r.e_best for r in rep.sites}
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            e_sum = sum(r.e_best for r in rep.sites)
            base_e = e_sum if method == "rtn" else base_e
            n_acc = sum(r.accepted for r in rep.sites)
            rows.append((fmt, method, err, e_sum, e_sum / base_e if base_e else float("nan"), n_acc, len(rep.sites),
                         secs))
            print(f"{fmt:>6} {method:<13} latent rel err {err:.4f}  sum E {e_sum:.4g}  accepted {n_acc}/"
                  f"{len(rep.sites)}  ({secs:.0f}s)", flush=True)
    lines = [
        "# Quality on a synthetic FLUX (measured, not tuned)", "",
        f"Model: `FluxConfig.tiny(num_attention_heads={args.heads}, num_layers={args.layers}, "
        f"num_single_layers={args.single})` (D={cfg.inner_dim}) with `synthetic.outlier_params(seed=0)`; "
        f"{args.calib_prompts} calibration prompts and {args.eval_prompts} held-out prompts (random embeddings), "
        f"{args.size}x{args.size} px, {args.steps} steps. Produced by `python examples/quality_table.py "
        f"--heads {args.heads} --layers {args.layers} --single {args.single}`.", "",
        "| format | method | final-latent rel. error | sum of site E | E / E_RTN | accepted sites |",
        "|---|---|---|---|---|---|",
    ]
    for fmt, method, err, e_sum, ratio, n_acc, n_sites, _ in rows:
        lines.append(f"| {fmt} | {method} | {err:.4f} | {e_sum:.4g} | {ratio:.3f} | {n_acc}/{n_sites} |")
    for fmt in args.formats.split(","):
        ms = [m for m in args.methods.split(",") if (fmt, m) in per_site]
        lines += ["", f"Per-site calibration error E ({fmt}; lower is better):", "",
                  "| site | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
        for site in per_site[(fmt, ms[0])]:
            lines.append(f"| {site} | " + " | ".join(f"{per_site[(fmt, m)][site]:.4g}" for m in ms) + " |")
    lines += ["", "## Reading the numbers", "",
              "- Acceptance guarantees only that no site's calibration error E grows (`E_best <= E_orig` per site); "
              "the tables show the summed E of PermuQuant below RTN for every format, and PermuQuant-H below the plain "
              "Hadamard rotation.",
              "- Lower site errors do not always give a lower final-latent error on this model: its 30x massive residual "
              "channels make the output sensitive to *where* the error lands (errors in the massive channels shift "
              "every later LayerNorm), which E, a plain sum of squares over outputs, does not weigh.",
              "- Channel reordering pays most where groups are many and channel scales vary a lot (NVFP4's 16-blocks, "
              "INT3); with INT4 g64 the tiny model's K=256 has only 4 groups per row, so there is little to reorder.",
              "- SmoothQuant and Hadamard rotations are strong baselines on this synthetic model because its outliers "
              "are static per channel (by construction); real FLUX activations are timestep-dependent."]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
