"""Train the ShapeEval attribute classifier on freshly generated shapes scenes and report held-out accuracy.

    python examples/train_shapeeval.py --steps 1500 --install      # what ships (pqjax/demo/assets/shapeeval.npz)
    python examples/train_shapeeval.py --steps 1000 --out checkpoints/shapeeval.npz [--size 32] [--batch 64]

Held-out images come from ``make_dataset(--eval-n, seed=--eval-seed)``; training batches use data seeds >= 1e6.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import demo_training as dt  # examples/demo_training.py, beside this script
from pqjax.demo import classifier as C
from pqjax.demo import make_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, choices=(32, 64))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--augment", type=float, default=0.5,
                    help="fraction of each batch corrupted by demo_training.augment (noise, blur, shift, colour)")
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--eval-seed", type=int, default=424242)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--out", default=None, help="where to save the params (.npz)")
    ap.add_argument("--install", action="store_true", help="save as the shipped classifier (pqjax/demo/assets)")
    args = ap.parse_args(argv)

    t0 = time.time()
    params = dt.train_classifier(seed=args.seed, steps=args.steps, batch=args.batch, size=args.size, lr=args.lr,
                     log_every=args.log_every, augment_fraction=args.augment)
    train_s = time.time() - t0
    images, _, scenes = make_dataset(args.eval_n, seed=args.eval_seed, size=args.size)
    acc = C.evaluate(params, images, scenes)
    noisy = np.asarray(dt.augment(jax.random.PRNGKey(args.eval_seed), images))
    acc_aug = C.evaluate(params, noisy, scenes)
    print(f"trained {args.steps} steps x batch {args.batch} at {args.size}px in {train_s:.1f}s")
    print(f"held-out accuracy on {args.eval_n} images (clean | augmented):")
    for k, v in acc.items():
        print(f"  {k:9s} {100 * v:6.2f}%  {100 * acc_aug[k]:6.2f}%")
    if args.install:
        from pqjax.demo import assets
        args.out = args.out or assets.SHAPEEVAL
    if args.out:
        dt.save_classifier(params, args.out)
        print(f"saved {args.out}")
    return acc


if __name__ == "__main__":
    main()
