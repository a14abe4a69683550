"""Attention at the FLUX pipeline's real shapes: compiled temp bytes (and, with --time, time) per implementation.

    python examples/bench_attention.py [--time] [--reps 5] [--dtype bfloat16]

Not a test: prints a table. "unblocked" is jax.nn.dot_product_attention(implementation="xla") as is (the whole
[B, H, Sq, Sk] fp32 logits at once, what pqjax ran before); "xla" is pqjax.models.layers.attention's query-blocked
XLA path; "auto" is layers.attention's default (cuDNN flash attention where this device is a CUDA GPU and cuDNN
serves the shape and dtype, else the same as "xla"). Temp bytes come from the compiled executable's
memory_analysis (no run); --time also runs each one on random inputs after a warm-up call.
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.models import layers

#: name: (B, Sq, H, D, bias, is_causal, scale) at FLUX.1-dev 1024^2 (4096 image + 512 text tokens), T5-XXL at 512
#: tokens (its relative-position bias), CLIP-L at 77 (causal), the VAE mid block at 1024^2 (128x128 latents, one head)
SHAPES = {
    "FLUX block 1024^2": (1, 4608, 24, 128, False, False, None),
    "T5-XXL layer (512)": (1, 512, 64, 64, True, False, 1.0),
    "CLIP-L layer (77)": (1, 77, 12, 64, False, True, None),
    "VAE mid block 1024^2": (1, 16384, 1, 512, False, False, None),
}


def implementations(scale, is_causal):
    unblocked = functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=is_causal,
                                  implementation="xla")
    return {"unblocked": unblocked,
            "xla": functools.partial(layers.attention, scale=scale, is_causal=is_causal, implementation="xla"),
            "auto": functools.partial(layers.attention, scale=scale, is_causal=is_causal)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--time", action="store_true", help="also time each implementation (slow on a CPU)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; dtype {dtype.name}; "
          f"LOGITS_BLOCK_BYTES = {layers.LOGITS_BLOCK_BYTES >> 20} MiB")
    head = f"{'shape':>22} {'impl':>9} {'logits MiB':>10} {'temp MiB':>9} {'cuDNN':>5}"
    print(head + (f" {'ms':>9} {'vs unblocked':>12}" if args.time else ""))
    rng = np.random.default_rng(0)
    for name, (B, S, H, D, with_bias, is_causal, scale) in SHAPES.items():
        qkv = [jnp.asarray(rng.standard_normal((B, S, H, D)), dtype) for _ in range(3)]
        bias = jnp.asarray(rng.standard_normal((1, H, S, S)), dtype) if with_bias else None
        base_ms = None
        for impl, fn in implementations(scale, is_causal).items():
            f = jax.jit(fn)
            lowered = f.lower(*qkv, bias)
            cudnn = "__cudnn$fmha" in lowered.as_text()
            temp = lowered.compile().memory_analysis().temp_size_in_bytes
            line = f"{name:>22} {impl:>9} {B * H * S * S * 4 / 2**20:>10.0f} {temp / 2**20:>9.1f} {str(cudnn):>5}"
            if args.time:
                f(*qkv, bias).block_until_ready()
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    f(*qkv, bias).block_until_ready()
                    times.append(time.perf_counter() - t0)
                ms = 1e3 * float(np.median(times))
                base_ms = base_ms or ms
                line += f" {ms:>9.2f} {base_ms / ms:>12.2f}"
            print(line)


if __name__ == "__main__":
    main()
