"""Train the pixel-space FLUX demo model on the shapes data; save it and a PNG grid of held-out samples.

    python examples/train_demo_model.py --steps 10000 --batch 32 --seed 0 --out demo_run [--install]

Writes ``OUT/model`` (``demo_training.save``: diffusers transformer folder + text encoder + tokenizer, what
``pqjax.demo.model.load`` reads),
``OUT/samples.png`` (each row: a held-out caption's training-distribution reference image, then samples for
``--samples`` noise seeds) with ``OUT/samples.txt`` listing the captions, and ``OUT/losses.txt`` (loss per step).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax.numpy as jnp

import demo_training as dt  # examples/demo_training.py, beside this script
from pqjax.demo import make_dataset
from pqjax.demo import model as dm
from pqjax.demo.benchmark import write_grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_model"))
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: TrainConfig's)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (head dim 64)")
    ap.add_argument("--decay", action=argparse.BooleanOptionalAction, default=True,
                    help="cosine-decay the learning rate to 0 over --steps (default on)")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="also save OUT/checkpoints/step_N every N steps")
    ap.add_argument("--resume", type=pathlib.Path, default=None,
                    help="continue from this saved model (fresh optimizer; its config wins over --heads)")
    ap.add_argument("--install", action="store_true",
                    help="also copy OUT/model into the package as the shipped demo model (pqjax/demo/assets)")
    ap.add_argument("--captions", type=int, default=8, help="held-out captions in the grid")
    ap.add_argument("--samples", type=int, default=4, help="noise seeds per caption")
    ap.add_argument("--sample-steps", type=int, default=20)
    args = ap.parse_args(argv)

    start = dm.load(args.resume) if args.resume else None
    cfg = dt.TrainConfig(model=start.config) if start is not None else dt.TrainConfig()
    if args.lr is not None:
        cfg = dataclasses.replace(cfg, learning_rate=args.lr)
    if args.heads is not None and start is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_attention_heads=args.heads))
    if args.decay:
        cfg = dataclasses.replace(cfg, decay_steps=max(1, args.steps - cfg.warmup_steps))
    if start is not None:  # same weights, this run's schedule; step counting (and data seeds) continue
        start = dt.TrainState(params=start.params, opt_state=dt.optimizer(cfg).init(start.params),
                              step=jnp.asarray(start.step, jnp.int32), config=cfg)
    model_dir = args.out / "model"
    if model_dir.exists():
        raise SystemExit(f"{model_dir} exists; choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"transformer: {cfg.model.flux}\ntext encoder: {cfg.model.text}", flush=True)

    losses: list[float] = []
    t0 = time.perf_counter()

    def checkpoint(state):
        dt.save(state, args.out / "checkpoints" / f"step_{int(state.step)}")

    state = dt.train(args.seed, args.steps, args.batch, args.log_every, config=cfg, losses=losses,
                     callback=checkpoint, callback_every=args.checkpoint_every, state=start)
    took = time.perf_counter() - t0
    print(f"trained {args.steps} steps in {took:.1f} s ({took / max(1, args.steps):.3f} s/step incl. compile)")
    (args.out / "losses.txt").write_text("".join(f"{i + 1} {v:.6f}\n" for i, v in enumerate(losses)))

    dt.save(state, model_dir)

    refs, captions, _ = make_dataset(args.captions, seed=dt.HELDOUT_SEED)
    samples = [dm.generate(state.model, captions, seed=s, steps=args.sample_steps) for s in range(args.samples)]
    write_grid(args.out / "samples.png", [refs] + samples, ["reference"] + [f"seed {s}" for s in range(args.samples)],
               row_labels=captions)
    (args.out / "samples.txt").write_text("".join(f"row {i}: {c}\n" for i, c in enumerate(captions)))
    print(f"wrote {model_dir}, {args.out / 'samples.png'} (rows: {', '.join(captions)})")
    if args.install:
        import shutil

        from pqjax.demo import assets
        tmp = assets.DEMO_MODEL.with_name(assets.DEMO_MODEL.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        shutil.rmtree(assets.DEMO_MODEL, ignore_errors=True)
        tmp.rename(assets.DEMO_MODEL)
        print(f"installed {model_dir} as {assets.DEMO_MODEL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
