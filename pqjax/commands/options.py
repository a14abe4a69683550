"""The command line's one vocabulary: the same flag names the same thing in every subcommand.

    --prompt TEXT | --prompts FILE | --embeddings FILE   what to condition on
    --components FOLDER, --max-sequence-length N       the pipeline folder that encodes prompts (and decodes)
    --steps N --guidance G --height H --width W --seed N   the sampler's settings (quantize calibrates on them)
    --dtype bfloat16|float16|float32                   parameter dtype
    --format, --method, --group-size, --rules          quantization
    --out PATH, --overwrite, --json, --quiet            outputs

Old spellings (``--guidance-scale``, ``--calib-embeds``, ``--embeds``, ``--calib-prompts``, ``--calib-steps``,
``--size`` / ``--calib-size HxW``, ``--seeds``, ``--batch``, ``--formats``, ``--model``, ``bf16`` / ``f16`` /
``f32``, ...) still parse for one version: hidden from ``--help``, each use logs a deprecation warning.
"""
from __future__ import annotations

import argparse
import logging

__all__ = ["DTYPES", "old_flag", "deprecations", "warn_deprecated", "add_text_inputs", "add_components",
           "add_sampling", "add_dtype", "add_overwrite", "add_quantization", "parse_size"]

log = logging.getLogger("pqjax.commands")

DTYPES = ("bfloat16", "float16", "float32")
_OLD_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
_NOTES = "_deprecated"


def _note(ns, msg: str) -> None:
    notes = getattr(ns, _NOTES, None) or []
    if msg not in notes:
        notes.append(msg)
    setattr(ns, _NOTES, notes)


def deprecations(ns) -> list[str]:
    """The deprecation notes the parse of ``ns`` collected."""
    return list(getattr(ns, _NOTES, None) or [])


def warn_deprecated(ns) -> None:
    for msg in deprecations(ns):
        log.warning(msg)


class _Old(argparse.Action):
    """A deprecated spelling of a flag: hidden from --help, stores what the new flag would, notes the deprecation."""

    def __init__(self, option_strings, dest, new: str, convert=None, **kw):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new, self.convert = new, convert

    def __call__(self, parser, ns, values, option_string=None):
        if self.convert is None:
            setattr(ns, self.dest, values)
        else:
            for k, v in self.convert(values, parser, option_string).items():
                setattr(ns, k, v)
        _note(ns, f"{option_string} is deprecated and will be removed in the next version; use {self.new}")


def old_flag(p, flag: str, new: str, *, dest: str, convert=None, **kw) -> None:
    """Add the hidden deprecated ``flag`` for ``new`` (same ``dest``; ``convert(value, parser, flag)`` -> {dest:
    value} for spellings that mean several flags, e.g. ``--size HxW``)."""
    p.add_argument(flag, dest=dest, action=_Old, new=new, convert=convert, **kw)


class _Dtype(argparse.Action):
    def __call__(self, parser, ns, value, option_string=None):
        if value in _OLD_DTYPES:
            _note(ns, f"{option_string} {value} is deprecated; use {option_string} {_OLD_DTYPES[value]}")
            value = _OLD_DTYPES[value]
        if value not in DTYPES:
            parser.error(f"argument {option_string}: invalid choice: {value!r} (choose from {', '.join(DTYPES)})")
        setattr(ns, self.dest, value)


def add_dtype(p, default: str | None, help: str) -> None:
    p.add_argument("--dtype", action=_Dtype, default=default, metavar="{" + ",".join(DTYPES) + "}", help=help)


def add_overwrite(p, what: str = "OUT") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists")


def add_text_inputs(p, *, required: bool = False, what: str = "prompts"):
    """--prompt / --prompts / --embeddings (one of them), --components, --max-sequence-length."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--prompt", metavar="TEXT", help="one prompt")
    g.add_argument("--prompts", metavar="FILE", help=f"text file of {what}, one per line (blank lines skipped)")
    g.add_argument("--embeddings", metavar="FILE",
                   help="precomputed prompt embeddings (.safetensors from --save-embeddings / PromptEmbeddings.save, "
                        "or tensors encoder_hidden_states + pooled_projections): the text encoders are not loaded")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens per prompt (<= 512, default 512)")
    return g


def add_components(p, help: str) -> None:
    p.add_argument("--components", metavar="FOLDER", help=help)


def parse_size(value: str, parser, flag: str) -> tuple[int, int]:
    """``N`` or ``HxW`` in pixels (a usage error otherwise)."""
    try:
        parts = [int(v) for v in str(value).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        parser.error(f"argument {flag}: expected N or HxW in pixels, got {value!r}")
    return parts[0], parts[1]


def _size_to_hw(value, parser, flag):
    h, w = parse_size(value, parser, flag)
    return {"height": h, "width": w}


def add_sampling(p, *, steps_help: str, size: int, seed_help: str = "noise seed (default 0)",
                 several_seeds: bool = False) -> None:
    """--steps, --guidance, --height, --width, --seed (the sampler's settings)."""
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance scale (FLUX.1-dev; default 3.5)")
    p.add_argument("--height", type=int, default=size, help=f"image height in pixels, a multiple of 16 (default {size})")
    p.add_argument("--width", type=int, default=size, help=f"image width in pixels, a multiple of 16 (default {size})")
    if several_seeds:
        p.add_argument("--seed", type=int, nargs="+", default=[0, 1], metavar="SEED", help=seed_help)
        old_flag(p, "--seeds", "--seed", dest="seed", type=int, nargs="+")
    else:
        p.add_argument("--seed", type=int, default=0, help=seed_help)
    old_flag(p, "--guidance-scale", "--guidance", dest="guidance", type=float)
    old_flag(p, "--size", "--height and --width", dest="height", convert=_size_to_hw)


def add_quantization(p, *, formats_plural: bool = False) -> None:
    """--format (several with ``formats_plural``), --method, --group-size, --rules."""
    from pqjax.config import METHODS
    from pqjax.formats import FORMATS
    if formats_plural:
        p.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FMT",
                       help="formats to measure (default: " + " ".join(FORMATS) + ")")
        old_flag(p, "--formats", "--format", dest="format", nargs="+", choices=FORMATS)
    else:
        p.add_argument("--format", choices=FORMATS, default="nvfp4", help="quantization format (default: nvfp4)")
    p.add_argument("--method", choices=METHODS, default="permuquant", help="method (default: permuquant)")
    p.add_argument("--group-size", type=int, help="INT group size along K: 32, 64 (default) or 128; nvfp4 is 16")
    p.add_argument("--rules", metavar="FILE",
                   help="JSON list of [pattern, action(, on_indivisible)] rules (regex on module paths, first match "
                        "wins; actions w4a4, w4a16, keep); default: the built-in rules (pqjax.DEFAULT_RULES)")
