"""``QuantConfig``: what to quantize and how; rules are regexes on module paths, first match wins."""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple, Sequence

from pqjax import formats
from pqjax.permute import DEFAULT_ALPHA_GRID

METHODS = ("rtn", "smoothquant", "hadamard", "permuquant", "permuquant-h")
ACTIONS = ("w4a4", "w4a16", "keep")


class Rule(NamedTuple):
    """``pattern`` (``re.fullmatch`` on a linear's module path) -> ``action``: ``w4a4`` (weights and activations in
    the format), ``w4a16`` (weight-only) or ``keep`` (16-bit). ``on_indivisible``: what to do when the linear's K is
    not a multiple of the group: ``skip`` (keep it in 16 bits and report it) or ``error``."""

    pattern: str
    action: str
    on_indivisible: str = "skip"


# The defaults: modulation linears read one token per sample -> weight-only; embedders, norm_out and the
# output projection stay in 16 bits; every other linear is W4A4.
DEFAULT_RULES = (
    Rule(r"(transformer_blocks\.\d+\.norm1(_context)?|single_transformer_blocks\.\d+\.norm)\.linear", "w4a16"),
    Rule(r"x_embedder|context_embedder|time_text_embed\..*|norm_out\.linear|proj_out", "keep"),
    Rule(r".*", "w4a4"),
)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How ``pqjax.quantize`` quantizes a model.

    format: "nvfp4" | "int4" | "int3". group_size: INT group along K (32/64/128, default 64; NVFP4 is 16); after
      construction it holds the resolved size (:func:`pqjax.formats.resolve_group`).
    method: "rtn" | "smoothquant" | "hadamard" (block Hadamard rotation, ConvRot-style, no permutation) |
      "permuquant" | "permuquant-h" (permutation then block Hadamard).
    alpha_grid / tau: PermuQuant's score exponents searched per site and acceptance threshold.
    smoothquant_alpha: migration strength of SmoothQuant. calib_rows / calib_seed: sampled rows per site.
    rules: sequence of :class:`Rule` (or (pattern, action[, on_indivisible]) tuples), first match wins.
    """

    format: str = "nvfp4"
    method: str = "permuquant"
    group_size: int | None = None
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    tau: float = 0.0
    smoothquant_alpha: float = 0.5
    calib_rows: int = 256
    calib_seed: int = 0
    rules: tuple[Rule, ...] = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        object.__setattr__(self, "rules", tuple(Rule(*r) for r in self.rules))
        if self.format not in formats.FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {formats.FORMATS}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        object.__setattr__(self, "group_size", formats.resolve_group(self.format, self.group_size))
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"alpha_grid values must lie in [0, 1], got {self.alpha_grid}")
        if self.calib_rows < 1:
            raise ValueError(f"calib_rows must be >= 1, got {self.calib_rows}")
        for r in self.rules:
            if r.action not in ACTIONS:
                raise ValueError(f"rule {r.pattern!r}: unknown action {r.action!r}; expected one of {ACTIONS}")
            if r.on_indivisible not in ("skip", "error"):
                raise ValueError(f"rule {r.pattern!r}: on_indivisible must be 'skip' or 'error'")
            try:
                re.compile(r.pattern)
            except re.error as e:
                raise ValueError(f"rule {r.pattern!r}: invalid regex ({e})") from None

    @property
    def group(self) -> int:
        """The block/group size along K (``group_size`` after defaults: 16 for nvfp4, 64 for INT)."""
        return self.group_size

    @property
    def permutes(self) -> bool:
        return self.method in ("permuquant", "permuquant-h")

    @property
    def rotates(self) -> bool:
        return self.method in ("hadamard", "permuquant-h")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rules"] = [list(r) for r in self.rules]
        d["alpha_grid"] = list(self.alpha_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(**{**d, "rules": tuple(tuple(r) for r in d.get("rules", DEFAULT_RULES))})


def resolve_rules(paths: Sequence[str], rules: Sequence[Rule]) -> tuple[dict[str, Rule], list[Rule]]:
    """Map each linear path to its first matching rule; also return the rules that matched nothing."""
    compiled = [(r, re.compile(r.pattern)) for r in rules]
    used, out = set(), {}
    for p in paths:
        for i, (r, rx) in enumerate(compiled):
            if rx.fullmatch(p):
                out[p] = r
                used.add(i)
                break
        else:
            out[p] = Rule(".*", "keep")
    return out, [r for i, (r, _) in enumerate(compiled) if i not in used]
