"""Time ``pqjax.permute.search_site`` at FLUX.1-dev site shapes and extrapolate the whole-model search.

    python examples/bench_search.py [--rows 512] [--fmt nvfp4] [--quick]

Not a test: prints one table (one row per FLUX.1-dev site type: K, consumer outputs, count per model, measured
seconds per site on this device, FLOPs) and the whole-model estimate = sum(count x seconds). The candidate errors
cost ``(1 + len(alpha_grid)) x (2 n K N + fake-quant of K x N weights)``, so the estimate for another device scales
with its matmul throughput; the printout also gives the total FLOPs so it can be divided by a device's rate.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from pqjax.models.flux import FluxConfig
from pqjax.permute import DEFAULT_ALPHA_GRID, search_site


def site_types(c: FluxConfig):
    D, mlp, L, S = c.inner_dim, c.mlp_hidden_dim, c.num_layers, c.num_single_layers
    n_mod_out = 2 * L * 6 * D + S * 3 * D  # modulation linears read one SiLU(temb) site
    return [  # name, K, consumer outputs, separate activations per consumer, count, weight-only
        ("double P1 (q,k,v)", D, (D, D, D), False, 2 * L, False),
        ("double P3 (ff in)", D, (mlp,), False, 2 * L, False),
        ("double P4 (ff out)", mlp, (D,), False, 2 * L, False),
        ("double P2 (o-proj x2)", D, (D, D), True, L, False),
        ("single P1 (q,k,v,mlp)", D, (D, D, D, mlp), False, S, False),
        ("single OUT (proj_out)", D + mlp, (D,), False, S, False),
        ("MOD (adaLN, W4A16)", D, (n_mod_out,), False, 1, True),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--fmt", default="nvfp4", choices=("nvfp4", "int4", "int3"))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="time the MOD site on 1/16 of its outputs and scale")
    args = ap.parse_args(argv)
    c = FluxConfig.flux_dev()
    rng = np.random.default_rng(0)
    n_cand = 1 + len(DEFAULT_ALPHA_GRID)
    print(f"device: {jax.devices()[0].device_kind}; format {args.fmt}; {args.rows} rows; {n_cand} candidates")
    print(f"{'site type':<24} {'K':>6} {'outputs':>8} {'count':>5} {'s/site':>8} {'GFLOP/site':>11} {'total s':>9}")
    total_s = total_flop = total_bytes = 0.0
    for name, k, outs, separate, count, weight_only in site_types(c):
        scale = 1
        if args.quick and len(outs) == 1 and outs[0] > 4 * 18432:
            scale, outs = 16, (outs[0] // 16,)
        x_scale = np.exp(rng.standard_normal(k)).astype(np.float32)
        xs = [(rng.standard_normal((args.rows, k)) * x_scale).astype(np.float32) for _ in (outs if separate else [0])]
        ws = [(0.02 * rng.standard_normal((k, n))).astype(np.float32) for n in outs]
        x_arg = xs if separate else xs[0]
        kw = dict(fmt=args.fmt, act_quant=not weight_only)
        search_site(x_arg, ws, **kw)  # compile
        t0 = time.perf_counter()
        for _ in range(args.reps):
            search_site(x_arg, ws, **kw)
        secs = (time.perf_counter() - t0) / args.reps * scale
        flop = n_cand * sum(2 * args.rows * k * n for n in outs) * scale
        total_s += secs * count
        total_flop += flop * count
        # fake-quantizing each candidate's weights streams them a few times: ~16 bytes per element per candidate
        total_bytes += n_cand * 16 * k * sum(outs) * scale * count
        print(f"{name:<24} {k:>6} {sum(outs) * scale:>8} {count:>5} {secs:>8.2f} {flop / 1e9:>11.1f} "
              f"{secs * count:>9.1f}")
    print(f"whole FLUX.1-dev search on this device: {total_s:.0f} s ({total_s / 60:.1f} min); "
          f"{total_flop / 1e12:.1f} TFLOP of candidate matmuls")
    # extrapolation to a GPU: candidate matmuls at fp32 rate (HIGHEST precision) + weight streaming at HBM bandwidth
    for name, rate, bw in (("H100 SXM (fp32 ~50 TFLOP/s sustained, 3 TB/s)", 50e12, 3e12),):
        est = total_flop / rate + total_bytes / bw
        print(f"  extrapolated to {name}: ~{est:.0f} s ({total_flop / rate:.1f} s matmul + {total_bytes / bw:.1f} s "
              f"weight streaming); not measured")


if __name__ == "__main__":
    main()
