"""The ``pqjax`` command line. Each subcommand lives in ``pqjax/commands/<name>.py`` with ``add_parser`` and ``run``.

Exit codes: 0 ok, 1 failure (bad file, wrong model, ...), 2 usage error (argparse).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("convert", "quantize", "sample", "eval", "bench", "demo")


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pqjax", description="PermuQuant post-training quantization for FLUX in JAX")
    ap.add_argument("--version", action="version", version=f"pqjax {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"pqjax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pqjax.commands.{name}":
                raise
            continue  # command not built yet
        p = mod.add_parser(sub)
        p.add_argument("--quiet", action="store_true", help="print only errors and the final result")
        p.set_defaults(_run=mod.run)
    return ap


def _version() -> str:
    from pqjax import __version__
    return __version__


def _enable_compile_cache() -> None:
    """JAX's persistent compilation cache (PQJAX_CACHE_DIR, default ~/.cache/pqjax/jax; "0" turns it off): a second
    run of a command reuses the compiled sampler, calibration and search instead of compiling them again."""
    import os

    d = os.environ.get("PQJAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pqjax", "jax"))
    if d == "0":
        return
    import jax

    if jax.config.jax_compilation_cache_dir:  # the caller (e.g. a test) already chose one
        return
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _enable_compile_cache()
    try:
        return int(args._run(args) or 0)
    except CommandError as e:
        print(f"pqjax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pqjax {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pqjax {args.command}: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
