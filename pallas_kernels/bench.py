"""Benchmark the quantized-linear kernels at FLUX.1-dev GEMM shapes: ``python -m pallas_kernels.bench``.

On an NVIDIA GPU, for every M in {64, 512, 4608, 9216} and (K, N) in the FLUX linears, times

* ``w4a4``: the Pallas Triton W4A4 kernel (``--fmt``, default nvfp4; activation quantized inside),
* ``w4a16``: the Pallas Triton weight-only kernel,
* ``bf16``: XLA ``dot_general`` bf16 x bf16 -> bf16 (fp32 accumulation),
* ``fp8``: XLA ``dot_general`` on pre-cast float8_e4m3fn operands -> bf16,
* ``sdg-nvfp4``: ``jax.nn.scaled_dot_general`` with the nvfp4 config (cuDNN; Blackwell only,
  'n/a' where unsupported),

each as the median over ``--rounds`` rounds of ``--reps`` back-to-back calls after warm-up,
synchronized with ``block_until_ready`` around each round, and prints TFLOP/s (2*M*K*N / t) with
the speed-up over bf16 beside it.  ``--check`` also prints how often the W4A4 kernel's output
rows differ from the XLA reference beyond fp32 accumulation (rounding ties; see the reference's
docs) for both division modes.  ``--autotune`` tries a few block configurations per shape for
the W4A4 kernel and prints the best (a table to paste into ``triton_kernels.choose_blocks``).

Without a GPU it says so and runs one tiny interpret-mode shape comparing kernel and reference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

M_LIST = (64, 512, 4608, 9216)
KN_LIST = ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 18432))
AUTOTUNE_BLOCKS = (
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=256, num_warps=8, num_stages=2),
    dict(block_m=64, block_n=128, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=256, num_warps=8, num_stages=3),
)


def _time(fn, *args, reps: int, rounds: int) -> float:
    """Median seconds per call: ``rounds`` x (``reps`` calls, then block_until_ready)."""
    out = fn(*args)
    jax.block_until_ready(out)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def _try_time(make, *, reps, rounds):
    try:
        fn, args = make()
        return _time(fn, *args, reps=reps, rounds=rounds)
    except Exception as e:  # unsupported on this GPU / backend
        return f"n/a ({type(e).__name__})"


def _on_nvidia_gpu() -> bool:
    try:
        return jax.devices()[0].platform == "gpu"
    except RuntimeError:
        return False


def _operands(m, k, n, fmt, group, seed=0):
    from pqjax.formats import NVFP4_RANGE, quantize

    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w_f = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    w = jax.jit(lambda w: quantize(w, fmt, axis=0, group_size=group))(w_f)
    gx = jnp.float32(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / NVFP4_RANGE)
    return x, w_f, w, gx


def _fmt_cell(t, flops, t_bf16):
    if isinstance(t, str):
        return f"{t:>20}"
    tf = flops / t / 1e12
    ratio = (t_bf16 / t) if isinstance(t_bf16, float) else float("nan")
    return f"{tf:8.1f} TF/s {ratio:5.2f}x"


def bench_gpu(args):
    from pallas_kernels import triton_kernels as tk

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} (compute capability {getattr(dev, 'compute_capability', '?')}), "
          f"jax {jax.__version__}; W4A4 format {args.fmt}; median of {args.rounds} x {args.reps} calls")
    group = None if args.fmt == "nvfp4" else args.group
    cols = ["w4a4", "w4a16", "bf16", "fp8", "sdg-nvfp4"]
    print(f"{'M':>5} {'K':>6} {'N':>6} | " + " | ".join(f"{c:^20}" for c in cols)
          + "   (TFLOP/s, speed-up vs bf16)")
    ms = args.m or M_LIST
    for k, n in KN_LIST:
        for m in ms:
            x, w_f, w, gx = _operands(m, k, n, args.fmt, group)
            flops = 2.0 * m * k * n
            kw = dict(reps=args.reps, rounds=args.rounds)
            res = {}
            res["bf16"] = _try_time(lambda: (jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)),
                                             (x, w_f)), **kw)
            res["w4a4"] = _try_time(lambda: (jax.jit(lambda a, w, g: tk.w4a4_matmul(
                a, w, act_global_scale=g if args.fmt == "nvfp4" else None)), (x, w, gx)), **kw)
            res["w4a16"] = _try_time(lambda: (jax.jit(lambda a, w: tk.w4a16_matmul(a, w)), (x, w)), **kw)
            x8, w8 = x.astype(jnp.float8_e4m3fn), w_f.astype(jnp.float8_e4m3fn)
            res["fp8"] = _try_time(lambda: (jax.jit(lambda a, b: jax.lax.dot_general(
                a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16)), (x8, w8)), **kw)

            def make_sdg():
                cfg = jax.nn.get_scaled_dot_general_config("nvfp4", global_scale=gx)
                wt = w_f.T  # [N, K]: contract the last dims of both
                f = jax.jit(lambda a, b: jax.nn.scaled_dot_general(
                    a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16, configs=[cfg, cfg]))
                return f, (x, wt)

            res["sdg-nvfp4"] = _try_time(make_sdg, **kw)
            print(f"{m:>5} {k:>6} {n:>6} | " + " | ".join(_fmt_cell(res[c], flops, res["bf16"]) for c in cols),
                  flush=True)
            if args.autotune:
                autotune(x, w, gx, args, flops)
    if args.check:
        check_numerics(args)


def autotune(x, w, gx, args, flops):
    from pallas_kernels import triton_kernels as tk

    best = None
    for blocks in AUTOTUNE_BLOCKS:
        f = jax.jit(lambda a, w, g, blocks=blocks: tk.w4a4_matmul(
            a, w, act_global_scale=g if w.fmt == "nvfp4" else None, blocks=blocks))
        t = _try_time(lambda: (f, (x, w, gx)), reps=args.reps, rounds=args.rounds)
        if not isinstance(t, str) and (best is None or t < best[0]):
            best = (t, blocks)
        print(f"      autotune {blocks}: {_fmt_cell(t, flops, None)}")
    if best:
        print(f"      best: {best[1]} {flops / best[0] / 1e12:.1f} TFLOP/s")


def check_numerics(args):
    """Kernel vs XLA reference on the GPU: rows beyond fp32 accumulation, per division mode."""
    from pallas_kernels import reference
    from pallas_kernels import triton_kernels as tk

    print("\nnumerics: W4A4 kernel vs XLA reference (rows off beyond 1e-5 of |x|@|w|)")
    for fmt, group in (("nvfp4", None), ("int4", 64), ("int3", 64)):
        x, w_f, w, gx = _operands(512, 3072, 3072, fmt, group, seed=1)
        g = gx if fmt == "nvfp4" else None
        ref = jax.jit(lambda a, w, g: reference.w4a4_matmul(a, w, act_global_scale=g, out_dtype=jnp.float32))(x, w, g)
        bound = jnp.abs(x.astype(jnp.float32)) @ jnp.abs(w.dequantize(jnp.float32))
        for mode in ("ieee", "native"):
            try:
                out = jax.jit(lambda a, w, g, mode=mode: tk.w4a4_matmul(
                    a, w, act_global_scale=g, out_dtype=jnp.float32, div_mode=mode))(x, w, g)
                rel = jnp.max(jnp.abs(out - ref) / (bound + 1e-30), axis=1)
                print(f"  {fmt:6} div_mode={mode:6}: {int(jnp.sum(rel > 1e-5))} / {x.shape[0]} rows, "
                      f"max rel {float(jnp.max(rel)):.3g}")
            except Exception as e:
                print(f"  {fmt:6} div_mode={mode:6}: n/a ({type(e).__name__}: {e})")


def cpu_smoke():
    from pallas_kernels import reference
    from pallas_kernels import triton_kernels as tk

    print("no GPU present: timings need an NVIDIA GPU (sm_80+). "
          "Running one tiny interpret-mode shape instead.")
    m, k, n = 64, 256, 128
    x, _, w, gx = _operands(m, k, n, "nvfp4", None)
    t0 = time.perf_counter()
    out_k = jax.jit(lambda a, w, g: tk.w4a4_matmul(a, w, act_global_scale=g, out_dtype=jnp.float32,
                                                   interpret=True))(x, w, gx)
    out_r = jax.jit(lambda a, w, g: reference.w4a4_matmul(a, w, act_global_scale=g, out_dtype=jnp.float32))(x, w, gx)
    diff = float(jnp.max(jnp.abs(out_k - out_r)))
    print(f"nvfp4 W4A4 {m}x{k}x{n}: max |kernel - reference| = {diff:.3g} "
          f"(max |ref| = {float(jnp.max(jnp.abs(out_r))):.3g}); {time.perf_counter() - t0:.2f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fmt", default="nvfp4", choices=("nvfp4", "int4", "int3"))
    p.add_argument("--group", type=int, default=64, help="INT group size")
    p.add_argument("--m", type=int, nargs="*", help="M values (default: 64 512 4608 9216)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--autotune", action="store_true")
    p.add_argument("--check", action="store_true", help="kernel-vs-reference numerics on the GPU")
    args = p.parse_args(argv)
    if _on_nvidia_gpu():
        bench_gpu(args)
    else:
        cpu_smoke()
    return 0


if __name__ == "__main__":
    sys.exit(main())
