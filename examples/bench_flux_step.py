"""Jitted per-step time and parameter bytes of a mid-sized FLUX-architecture model on the current device.

    python examples/bench_flux_step.py [--heads 8] [--layers 4] [--single 8] [--tokens 1024] [--reps 5]

Not a test: prints a table. Parameter bytes are computed abstractly (jax.eval_shape), the step is timed on real
random weights after a warm-up (compile) call.
"""
import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.models import flux
from pqjax.models.flux import FluxConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (latent 2x2 patches)")
    ap.add_argument("--txt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    c = FluxConfig(num_attention_heads=args.heads, attention_head_dim=128, num_layers=args.layers,
                   num_single_layers=args.single, joint_attention_dim=1024, pooled_projection_dim=768,
                   guidance_embeds=True)
    shapes = flux.param_shapes(c, jnp.bfloat16)
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    print(f"device: {jax.devices()[0].device_kind}; config: D={c.inner_dim} heads={c.num_attention_heads} "
          f"double={c.num_layers} single={c.num_single_layers}; {n / 1e6:.1f}M params")
    print(f"{'dtype':>8} {'param MiB':>10} {'step s':>8} {'ratio':>6}")
    ids = np.stack([np.zeros(args.tokens), np.arange(args.tokens) // 32, np.arange(args.tokens) % 32], -1)
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        p = flux.init_params(c, jax.random.key(0), dtype=dtype)
        kw = dict(hidden_states=jnp.ones((1, args.tokens, 64), dtype),
                  encoder_hidden_states=jnp.ones((1, args.txt, 1024), dtype),
                  pooled_projections=jnp.ones((1, 768), dtype), timestep=jnp.full((1,), 0.5),
                  img_ids=jnp.asarray(ids, jnp.float32), txt_ids=jnp.zeros((args.txt, 3)),
                  guidance=jnp.full((1,), 3.5))
        step = jax.jit(lambda p, kw: flux.forward(c, p, **kw))
        step(p, kw).block_until_ready()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step(p, kw).block_until_ready()
            times.append(time.perf_counter() - t0)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p))
        rows.append((jnp.dtype(dtype).name, nbytes / 2**20, float(np.median(times))))
    for name, mib, t in rows:
        print(f"{name:>8} {mib:>10.1f} {t:>8.3f} {t / rows[0][2]:>6.2f}")


if __name__ == "__main__":
    main()
