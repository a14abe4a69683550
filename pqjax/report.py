"""``QuantReport``: what ``pqjax.quantize`` did, per site and per linear; it (de)serializes itself for checkpoints."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from pqjax.config import QuantConfig, Rule

__all__ = ["SiteReport", "QuantReport"]


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One permutation site: its width K, how many quantized linears read it, the search's outcome."""

    site: str
    k: int
    consumers: int
    accepted: bool
    alpha: float | None
    e_orig: float
    e_best: float

    @property
    def gain(self) -> float:
        return (self.e_orig - self.e_best) / self.e_orig if self.e_orig > 0 else 0.0


@dataclasses.dataclass
class QuantReport:
    """What ``pqjax.quantize`` did: per site the accepted permutation, alpha, E_orig / E_best; per linear its mode."""

    config: QuantConfig
    sites: list[SiteReport]
    modes: dict[str, str]             # linear -> "w4a4" | "w4a16" | "keep"
    skipped: dict[str, str]           # linear -> why it stayed 16-bit against its rule
    unused_rules: list[Rule]
    seconds: dict[str, float]
    perms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # accepted permutations per site

    def table(self) -> str:
        lines = [f"{'site':<42} {'K':>6} {'acc':>4} {'alpha':>5} {'E_orig':>11} {'E_best':>11} {'gain':>7}"]
        for r in self.sites:
            alpha = "-" if r.alpha is None else f"{r.alpha:.2f}"
            lines.append(f"{r.site:<42} {r.k:>6} {'yes' if r.accepted else 'no':>4} {alpha:>5} {r.e_orig:>11.4g} "
                         f"{r.e_best:>11.4g} {100 * r.gain:>6.2f}%")
        return "\n".join(lines)

    def summary(self) -> str:
        n_acc = sum(r.accepted for r in self.sites)
        tot_o = sum(r.e_orig for r in self.sites)
        tot_b = sum(r.e_best for r in self.sites)
        counts = {m: sum(v == m for v in self.modes.values()) for m in ("w4a4", "w4a16", "keep")}
        s = (f"{self.config.method} {self.config.format} (group {self.config.group}): {len(self.sites)} sites, "
             f"{n_acc} permutations accepted; sum E {tot_o:.4g} -> {tot_b:.4g}; linears w4a4={counts['w4a4']} "
             f"w4a16={counts['w4a16']} 16-bit={counts['keep']}")
        if self.skipped:
            s += f"; {len(self.skipped)} kept in 16 bits (K not divisible by the group)"
        if self.unused_rules:
            s += "; rules that matched nothing: " + ", ".join(repr(r.pattern) for r in self.unused_rules)
        return s

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()

    def to_dict(self) -> dict:
        """JSON-able; :meth:`from_dict` inverts it."""
        return {"config": self.config.to_dict(), "sites": [dataclasses.asdict(r) for r in self.sites],
                "modes": dict(self.modes), "skipped": dict(self.skipped),
                "unused_rules": [list(r) for r in self.unused_rules], "seconds": dict(self.seconds),
                "perms": {k: np.asarray(v).tolist() for k, v in self.perms.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantReport":
        """Inverse of :meth:`to_dict` (TypeError / ValueError / KeyError for a dict it did not write)."""
        return cls(config=QuantConfig.from_dict(d["config"]),
                   sites=[SiteReport(**s) for s in d.get("sites", [])],
                   modes=dict(d.get("modes", {})), skipped=dict(d.get("skipped", {})),
                   unused_rules=[Rule(*r) for r in d.get("unused_rules", [])],
                   seconds=dict(d.get("seconds", {})),
                   perms={k: np.asarray(v, np.int32) for k, v in d.get("perms", {}).items()})

    @classmethod
    def parse(cls, d: dict | None):
        """:meth:`from_dict`, or ``d`` itself when it is no report this version reads (a checkpoint's weights are
        not refused for an unreadable report); ``None`` stays ``None``."""
        if d is None:
            return None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError, KeyError):
            return d

    @classmethod
    def as_dict(cls, report) -> dict | None:
        """A report or its :meth:`to_dict` (checked to be JSON-able, copied) -> the dict; ``None`` stays ``None``."""
        if report is None:
            return None
        if isinstance(report, cls):
            return report.to_dict()
        if isinstance(report, dict):
            return json.loads(json.dumps(report))
        raise TypeError(f"report must be a pqjax.QuantReport or its to_dict(), got {type(report).__name__}")
