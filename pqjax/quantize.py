"""``pqjax.quantize``: calibrate -> search -> absorb -> pack (PermuQuant's pipeline figure, top to bottom)."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import calib, formats
from pqjax import sites as S
from pqjax.config import QuantConfig, Rule, resolve_rules
from pqjax.models.flux import FluxConfig
from pqjax.formats import ActQuant
from pqjax.formats import block_hadamard
from pqjax.permute import search_site


@dataclasses.dataclass(frozen=True)
class SiteReport:
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
    modes: dict[str, str]
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
        return {"config": self.config.to_dict(), "sites": [dataclasses.asdict(r) for r in self.sites],
                "modes": dict(self.modes), "skipped": dict(self.skipped),
                "unused_rules": [list(r) for r in self.unused_rules], "seconds": dict(self.seconds),
                "perms": {k: np.asarray(v).tolist() for k, v in self.perms.items()}}


def quantize(params, calib_batch, *, config: QuantConfig = QuantConfig(), model_config: FluxConfig,
             progress: bool = True, log: Callable[[str], None] | None = None):
    """Quantize FLUX ``params`` with PermuQuant (or a baseline) -> ``(qparams, report)``.

    ``calib_batch``: a :class:`pqjax.calib.CalibBatch` (or dict of its fields): prompt embeddings and the sampler
    settings whose float trajectory is calibrated on. ``qparams`` run through ``pqjax.models.flux.forward`` and the
    jitted sampler like float params.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    times = {}
    g, fmt = config.group, config.format

    # 1. rules: which linears are W4A4, weight-only, or 16-bit
    paths = S.linear_paths(params)
    rule_of, unused = resolve_rules(paths, config.rules)
    modes, skipped = {}, {}
    for p in paths:
        r, k = rule_of[p], int(S.get_path(params, p)["kernel"].shape[0])
        if r.action != "keep" and k % g:
            if r.on_indivisible == "error":
                raise ValueError(f"linear {p}: K={k} is not a multiple of the {fmt} group size {g} "
                                 f"(rule {r.pattern!r} says on_indivisible='error')")
            skipped[p] = f"K={k} not a multiple of {g}"
            modes[p] = "keep"
        else:
            modes[p] = r.action
    table = S.flux_sites(model_config)
    tap_of = {c: inp for s in table for c, inp in zip(s.consumers, s.inputs)}
    quantized = [p for p in paths if modes[p] != "keep"]
    taps = tuple(dict.fromkeys(tap_of.get(p, p) for p in quantized))

    # 2. calibrate: one jitted pass of the float model over the sampler trajectory
    t0 = time.perf_counter()
    log(f"pqjax: calibrating {len(taps)} activations ...")
    stats = calib.calibrate(model_config, params, calib_batch, taps=taps, num_rows=config.calib_rows,
                            seed=config.calib_seed, progress=progress)
    times["calibrate"] = time.perf_counter() - t0

    # 3. search: per site, the permutation (or the baseline's transform) and its calibration error
    t0 = time.perf_counter()
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    reports, perms = [], {}
    smooth = _smoothquant_factors(params, stats, tap_of, modes, config) if config.method == "smoothquant" else {}
    active = [s for s in table if any(modes[c] != "keep" for c in s.consumers)]
    for n, site in enumerate(active):
        cons = [(c, inp) for c, inp in zip(site.consumers, site.inputs) if modes[c] != "keep"]
        act_quant = any(modes[c] == "w4a4" for c, _ in cons)
        xs = [stats[inp].rows for _, inp in cons]
        ws = [f32(S.get_path(params, c)["kernel"]) for c, _ in cons]
        mu2 = sum(stats[inp].sumsq for inp in dict.fromkeys(i for _, i in cons)) / \
            sum(stats[inp].count for inp in dict.fromkeys(i for _, i in cons))
        if smooth:  # SmoothQuant: x / s is quantized, W * s stored (W4A4 linears only)
            sms = [smooth.get(c) for c, _ in cons]
            xs = [x if s is None else x / s[None] for x, s in zip(xs, sms)]
            ws = [w if s is None else w * s[:, None] for w, s in zip(ws, sms)]
        scales = [_act_amax_estimate(stats[inp], x, None, False, g) / formats.NVFP4_RANGE for x, (_, inp) in zip(xs, cons)]
        res = search_site(xs, ws, fmt=fmt, group_size=g, alpha_grid=config.alpha_grid if config.permutes else (),
                          tau=config.tau, hadamard=config.rotates and act_quant, blocks=site.blocks, mu2_a=mu2,
                          act_quant=act_quant, act_global_scales=scales if fmt == "nvfp4" else None)
        if res.accepted:
            perms[site.name] = res.perm
        reports.append(SiteReport(site.name, site.k, len(cons), res.accepted, res.alpha, res.e_orig, res.e_best))
        if progress:
            print(f"\rpqjax search: site {n + 1}/{len(active)} {site.name:<40}", end="", file=sys.stderr, flush=True)
    if progress and active:
        print(file=sys.stderr)
    times["search"] = time.perf_counter() - t0

    # 4. absorb accepted permutations into the float params (the permuted float model is exact)
    t0 = time.perf_counter()
    qparams = params
    for site in table:
        if site.name in perms:
            qparams = S.absorb(qparams, site, perms[site.name])

    # 5. pack: rotate (Hadamard methods), smooth, quantize weights; static activation scales from calibration
    site_of = {c: s for s in table for c in s.consumers}
    for p in quantized:
        lin = dict(S.get_path(qparams, p))
        w = f32(lin["kernel"])
        perm = perms.get(site_of[p].name) if p in site_of else None
        rows = stats[tap_of.get(p, p)].rows
        rows = rows if perm is None else rows[:, perm]
        rotate = config.rotates and modes[p] == "w4a4"
        sm = smooth.get(p)
        if sm is not None:  # smoothing factors were computed in the original channel order
            sm = sm if perm is None else sm[perm]
            w, rows = w * sm[:, None], rows / sm[None]
        if rotate:
            w = block_hadamard(w, g, axis=0)
        qt = formats.quantize(w, fmt, axis=0, group_size=None if fmt == "nvfp4" else g)
        lin["kernel"] = dataclasses.replace(qt, dtype=jnp.dtype(lin["kernel"].dtype).name)  # dequantize() -> model dtype
        if modes[p] == "w4a4":
            amax = _act_amax_estimate(stats[tap_of.get(p, p)], rows, sm, rotate, g)
            lin["act_quant"] = ActQuant(global_scale=jnp.float32(amax / formats.NVFP4_RANGE if fmt == "nvfp4" else 1.0),
                                        smooth=None if sm is None else (1.0 / sm).astype(jnp.float32),
                                        hadamard=rotate)
        qparams = S.set_path(qparams, p, lin)
    qparams = jax.tree.map(lambda a: jnp.asarray(a), qparams)
    times["absorb+pack"] = time.perf_counter() - t0
    report = QuantReport(config, reports, modes, skipped, unused, times, perms)
    log(report.summary())
    return qparams, report


def _act_amax_estimate(st: calib.SiteStats, rows, smooth, rotate: bool, g: int) -> float:
    """Static amax of the activation as the kernel sees it (after smoothing / rotation).

    Without rotation it is exact from the per-channel calibration amax; a rotation mixes channels, so its amax is
    estimated on the sampled rows and scaled by how far the full calibration amax exceeds the sample's."""
    amax_ch = np.asarray(st.amax, np.float64)
    if smooth is not None:
        amax_ch = amax_ch / np.asarray(smooth, np.float64)  # smooth is in the site's original order here only
    full = float(amax_ch.max())
    if not rotate:
        return max(full, 1e-30)
    r = np.asarray(rows, np.float32)
    sample = float(np.abs(r).max())
    rot = float(np.abs(np.asarray(block_hadamard(jnp.asarray(r), g, axis=-1))).max())
    return max(rot * (full / sample if sample > 0 else 1.0), 1e-30)


def _smoothquant_factors(params, stats, tap_of, modes, config) -> dict[str, jax.Array]:
    """SmoothQuant per-input-channel factors s_j = amax_x[j]^a / amax_w[j]^(1-a) for each W4A4 linear
    (x / s is quantized, W * s is stored). Consumers sharing an input share s (their weights' amax pooled)."""
    a = config.smoothquant_alpha
    by_tap: dict[str, list[str]] = {}
    for p, m in modes.items():
        if m == "w4a4":
            by_tap.setdefault(tap_of.get(p, p), []).append(p)
    out = {}
    for tap, ps in by_tap.items():
        ax = jnp.maximum(jnp.asarray(stats[tap].amax, jnp.float32), 1e-5)
        aw = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(S.get_path(params, p)["kernel"], jnp.float32)), axis=1)
                                for p in ps]), axis=0)
        s = jnp.clip(ax ** a / jnp.maximum(aw, 1e-5) ** (1 - a), 1e-4, 1e4)
        for p in ps:
            out[p] = s
    return out
