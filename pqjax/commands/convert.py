"""``pqjax convert SRC OUT``: FLUX weights in any layout ``converters.load_flux`` reads -> a pqjax checkpoint."""
from __future__ import annotations

import math
import os
import sys
import time

DTYPES = {"bf16": "bfloat16", "f32": "float32", "f16": "float16"}


def add_parser(sub):
    p = sub.add_parser(
        "convert", help="FLUX weights (diffusers folder/file, pipeline folder, BFL file) -> pqjax checkpoint",
        description="Read FLUX transformer weights (a diffusers model folder, sharded or not; a diffusers pipeline "
                    "folder; or a single BFL/diffusers .safetensors file) and write a pqjax (orbax) checkpoint "
                    "directory OUT, or a single safetensors file if OUT ends in .safetensors.")
    p.add_argument("src", metavar="SRC", help="FLUX weights: folder or .safetensors file")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (or FILE.safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="parameter dtype (default: bf16)")
    p.add_argument("--axes-dims-rope", metavar="A,B,C",
                   help="RoPE axes of a single file whose head dim is not 128 (not stored in the weights), "
                        "e.g. 8,28,28")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def describe(config, params) -> str:
    import jax

    from pqjax.formats import QTensor, nbytes
    n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor)))
    return (f"FLUX {config.num_layers}+{config.num_single_layers} blocks, {human_count(n)} params, "
            f"{human_bytes(nbytes(params))}")


def human_count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"


def human_bytes(b: int) -> str:
    return f"{b / 2 ** 30:.3g} GiB" if b >= 2 ** 28 else f"{b / 2 ** 20:.3g} MiB"


def write_output(out: str, params, config, report=None, *, overwrite: bool = False) -> str:
    """Save to a pqjax checkpoint directory, or to one safetensors file when ``out`` ends in .safetensors."""
    from pqjax.cli import CommandError
    if out.endswith(".safetensors"):
        from pqjax.io import save_safetensors
        if os.path.exists(out) and not overwrite:
            raise CommandError(f"{out} already exists (use --overwrite to replace it)")
        return save_safetensors(out, params, config, report)
    import pqjax
    return pqjax.save(out, params, config, report, overwrite=overwrite)


def run(args) -> int:
    import jax.numpy as jnp

    from pqjax.cli import CommandError

    if not os.path.exists(args.src):
        raise CommandError(f"{args.src}: no such file or directory")
    if os.path.exists(args.out) and not args.overwrite:
        raise CommandError(f"{args.out} already exists (use --overwrite to replace it)")
    overrides = None
    if args.axes_dims_rope:
        try:
            overrides = {"axes_dims_rope": tuple(int(a) for a in args.axes_dims_rope.split(","))}
        except ValueError:
            raise CommandError(f"--axes-dims-rope must be comma-separated integers, got {args.axes_dims_rope!r}")
    import converters
    from pqjax.io import is_checkpoint
    if os.path.isdir(args.src) and is_checkpoint(args.src):
        raise CommandError(f"{args.src} is already a pqjax checkpoint (nothing to convert)")
    t0 = time.perf_counter()
    log(args, f"pqjax convert: reading {args.src} ...")
    config, params = converters.load_flux(args.src, dtype=jnp.dtype(DTYPES[args.dtype]), config_overrides=overrides)
    log(args, f"pqjax convert: writing {args.out} ...")
    path = write_output(args.out, params, config, overwrite=args.overwrite)
    print(f"wrote {path}: {describe(config, params)} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0
