"""The ``pqjax`` command line. Each subcommand lives in ``pqjax/commands/<name>.py`` with ``add_parser`` and ``run``;
the flags they share (one name for one thing) are :mod:`pqjax.commands.options`.

Exit codes: 0 ok, 1 failure (bad file, wrong model, ...: one line on stderr), 2 usage error (argparse).
Progress and notes go to stderr through ``logging`` (``--quiet``: warnings and errors only); results to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from pqjax.commands import CommandError, bench, convert, demo, options, quantize, sample
from pqjax.commands import eval as eval_command

__all__ = ["main", "build_parser", "CommandError", "COMMANDS"]

COMMANDS = {"convert": convert, "quantize": quantize, "sample": sample, "eval": eval_command, "bench": bench, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pqjax", description="PermuQuant post-training quantization for FLUX in JAX")
    ap.add_argument("--version", action="version", version=f"pqjax {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMANDS.values():
        p = mod.add_parser(sub)
        p.add_argument("--quiet", action="store_true", help="print only warnings, errors and the final result")
        p.set_defaults(_run=mod.run)
    return ap


def _version() -> str:
    from pqjax.version import __version__
    return __version__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests capture it per call)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


class _Formatter(logging.Formatter):
    def __init__(self, command: str):
        super().__init__()
        self.prefix = f"pqjax {command}: "

    def format(self, record):
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return self.prefix + level + record.getMessage()


@contextlib.contextmanager
def _logging(command: str, quiet: bool):
    """The library logs under ``pqjax``; the command shows it on stderr, one prefixed line per message."""
    logger = logging.getLogger("pqjax")
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(command))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _enable_compile_cache() -> None:
    """JAX's persistent compilation cache (PQJAX_CACHE_DIR, default ~/.cache/pqjax/jax; "0" turns it off): a second
    run of a command reuses the compiled sampler, calibration and search instead of compiling them again."""
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
    with _logging(args.command, args.quiet):
        options.warn_deprecated(args)
        _enable_compile_cache()
        try:
            return int(args._run(args) or 0)
        except CommandError as e:
            print(f"pqjax {args.command}: error: {e}", file=sys.stderr)
            return 1
        except (FileNotFoundError, FileExistsError, ValueError, KeyError, TypeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"pqjax {args.command}: error: {msg}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"pqjax {args.command}: interrupted", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
