"""``pqjax convert SRC OUT``: FLUX weights in any layout ``converters.load_flux`` reads -> a pqjax checkpoint."""
from __future__ import annotations

import logging
import time

from pqjax.commands import CommandError, options
from pqjax.commands.common import describe, must_exist, refuse_existing, write_output

log = logging.getLogger("pqjax.commands")


def add_parser(sub):
    p = sub.add_parser(
        "convert", help="FLUX weights (diffusers folder/file, pipeline folder, BFL file) -> pqjax checkpoint",
        description="Read FLUX transformer weights (a diffusers model folder, sharded or not; a diffusers pipeline "
                    "folder; or a single BFL/diffusers .safetensors file) and write a pqjax (orbax) checkpoint "
                    "directory OUT, or a single safetensors file if OUT ends in .safetensors.")
    p.add_argument("src", metavar="SRC", help="FLUX weights: folder or .safetensors file")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (or FILE.safetensors)")
    options.add_dtype(p, "bfloat16", "parameter dtype (default: bfloat16)")
    p.add_argument("--axes-dims-rope", metavar="A,B,C",
                   help="RoPE axes of a single file whose head dim is not 128 (not stored in the weights), "
                        "e.g. 8,28,28")
    options.add_overwrite(p)
    return p


def run(args) -> int:
    import jax.numpy as jnp

    import converters
    from pqjax.io import is_checkpoint

    must_exist(args.src)
    refuse_existing(args.out, args.overwrite)
    overrides = None
    if args.axes_dims_rope:
        try:
            overrides = {"axes_dims_rope": tuple(int(a) for a in args.axes_dims_rope.split(","))}
        except ValueError:
            raise CommandError(f"--axes-dims-rope must be comma-separated integers, got {args.axes_dims_rope!r}")
    if is_checkpoint(args.src):
        raise CommandError(f"{args.src} is already a pqjax checkpoint (nothing to convert)")
    t0 = time.perf_counter()
    log.info("reading %s ...", args.src)
    config, params = converters.load_flux(args.src, dtype=jnp.dtype(args.dtype), config_overrides=overrides)
    log.info("writing %s ...", args.out)
    path = write_output(args.out, params, config, overwrite=args.overwrite)
    print(f"wrote {path}: {describe(config, params)} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0
