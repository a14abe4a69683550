"""The stages of post-training quantization, each reusable on its own (``pqjax.ptq.quantize`` runs them in order):

    plan = plan_linears(params, model_config, config)       # rules: which linears are W4A4 / W4A16 / 16-bit
    stats = calib.calibrate(model_config, params, batch, taps=plan.taps, ...)   # (pqjax.calib)
    reports, perms = search_sites(params, stats, plan, config)                  # per site: permutation, E
    params = absorb_all(params, perms, plan.sites)          # permuted float model, exactly equivalent
    qparams = pack(params, plan, config, perms=perms, stats=stats)             # packed weights, act. scales

``pqjax bench`` packs without calibration (``stats=None``: placeholder activation scales, for bytes and timing);
``pqjax.evaluate`` absorbs a report's permutations into the float model to compare layer by layer.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import formats
from pqjax import sites as S
from pqjax.config import QuantConfig, Rule, resolve_rules
from pqjax.models.flux import FluxConfig
from pqjax.permute import search_site
from pqjax.progress import progress_bar
from pqjax.report import SiteReport

__all__ = ["LinearPlan", "plan_linears", "smoothquant_factors", "search_sites", "absorb_all", "pack"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """What the rules decided for every linear of a model, and what calibration has to observe."""

    modes: dict[str, str]            # linear path -> "w4a4" | "w4a16" | "keep"
    skipped: dict[str, str]          # linear -> why it stays 16-bit against its rule (K not a multiple of the group)
    unused_rules: list[Rule]
    sites: list[S.Site]              # the model's permutation sites
    tap_of: dict[str, str]           # linear -> the linear whose tapped input it reads (itself if not in a site)

    @property
    def quantized(self) -> list[str]:
        return [p for p, m in self.modes.items() if m != "keep"]

    @property
    def taps(self) -> tuple[str, ...]:
        """The linear inputs calibration must observe: one per activation the quantized linears read."""
        return tuple(dict.fromkeys(self.tap_of[p] for p in self.quantized))

    @property
    def active_sites(self) -> list[S.Site]:
        """Sites read by at least one quantized linear (the ones the search visits)."""
        return [s for s in self.sites if any(self.modes[c] != "keep" for c in s.consumers)]


def plan_linears(params, model_config: FluxConfig, config: QuantConfig) -> LinearPlan:
    """Apply ``config.rules`` to every linear of ``params`` (arrays or abstract shapes: only shapes are read)."""
    g = config.group
    paths = S.linear_paths(params)
    rule_of, unused = resolve_rules(paths, config.rules)
    modes, skipped = {}, {}
    for p in paths:
        r, k = rule_of[p], int(S.get_path(params, p)["kernel"].shape[0])
        if r.action != "keep" and k % g:
            if r.on_indivisible == "error":
                raise ValueError(f"linear {p}: K={k} is not a multiple of the {config.format} group size {g} "
                                 f"(rule {r.pattern!r} says on_indivisible='error')")
            skipped[p] = f"K={k} not a multiple of {g}"
            modes[p] = "keep"
        else:
            modes[p] = r.action
    table = S.flux_sites(model_config)
    tap_of = {p: p for p in paths}
    tap_of.update({c: inp for s in table for c, inp in zip(s.consumers, s.inputs)})
    return LinearPlan(modes, skipped, unused, table, tap_of)


def smoothquant_factors(params, stats, plan: LinearPlan, config: QuantConfig) -> dict[str, jax.Array]:
    """SmoothQuant per-input-channel factors s_j = amax_x[j]^a / amax_w[j]^(1-a) for each W4A4 linear
    (x / s is quantized, W * s is stored). Consumers sharing an input share s (their weights' amax pooled)."""
    a = config.smoothquant_alpha
    by_tap: dict[str, list[str]] = {}
    for p, m in plan.modes.items():
        if m == "w4a4":
            by_tap.setdefault(plan.tap_of[p], []).append(p)
    out = {}
    for tap, ps in by_tap.items():
        ax = jnp.maximum(jnp.asarray(stats[tap].amax, jnp.float32), 1e-5)
        aw = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(S.get_path(params, p)["kernel"], jnp.float32)), axis=1)
                                for p in ps]), axis=0)
        s = jnp.clip(ax ** a / jnp.maximum(aw, 1e-5) ** (1 - a), 1e-4, 1e4)
        for p in ps:
            out[p] = s
    return out


def act_amax(st, rows, smooth, rotate: bool, g: int) -> float:
    """Static amax of an activation as the kernel sees it (after smoothing / rotation).

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
    rot = float(np.abs(np.asarray(formats.block_hadamard(jnp.asarray(r), g, axis=-1))).max())
    return max(rot * (full / sample if sample > 0 else 1.0), 1e-30)


def search_sites(params, stats, plan: LinearPlan, config: QuantConfig, *, smooth: Mapping | None = None,
                 progress: bool = False) -> tuple[list[SiteReport], dict[str, np.ndarray]]:
    """Per active site: the method's candidate permutations (the identity only for non-permuting methods) and their
    calibration error E -> ``(reports, accepted permutations by site name)``."""
    smooth = smooth or {}
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    fmt, g = config.format, config.group
    reports, perms = [], {}
    active = plan.active_sites
    for site in progress_bar(active, desc="search", unit="site", enabled=progress):
        cons = [(c, inp) for c, inp in zip(site.consumers, site.inputs) if plan.modes[c] != "keep"]
        act_quant = any(plan.modes[c] == "w4a4" for c, _ in cons)
        xs = [stats[inp].rows for _, inp in cons]
        ws = [f32(S.get_path(params, c)["kernel"]) for c, _ in cons]
        taps = list(dict.fromkeys(i for _, i in cons))
        mu2 = sum(stats[t].sumsq for t in taps) / sum(stats[t].count for t in taps)
        if smooth:  # SmoothQuant: x / s is quantized, W * s stored (W4A4 linears only)
            sms = [smooth.get(c) for c, _ in cons]
            xs = [x if s is None else x / s[None] for x, s in zip(xs, sms)]
            ws = [w if s is None else w * s[:, None] for w, s in zip(ws, sms)]
        scales = [act_amax(stats[inp], x, None, False, g) / formats.NVFP4_RANGE for x, (_, inp) in zip(xs, cons)]
        res = search_site(xs, ws, fmt=fmt, group_size=g, alpha_grid=config.alpha_grid if config.permutes else (),
                          tau=config.tau, hadamard=config.rotates and act_quant, blocks=site.blocks, mu2_a=mu2,
                          act_quant=act_quant, act_global_scales=scales if fmt == "nvfp4" else None)
        if res.accepted:
            perms[site.name] = res.perm
        reports.append(SiteReport(site.name, site.k, len(cons), res.accepted, res.alpha, res.e_orig, res.e_best))
    return reports, perms


def absorb_all(params, perms: Mapping[str, np.ndarray], sites: list[S.Site]):
    """Absorb every site's permutation (``perms`` by site name) into float ``params`` (exact: same outputs)."""
    unknown = sorted(set(perms) - {s.name for s in sites})
    if unknown:
        raise ValueError(f"permutations for sites the model does not have: {unknown[:5]}")
    for site in sites:
        if site.name in perms:
            params = S.absorb(params, site, np.asarray(perms[site.name]))
    return params


def pack(params, plan: LinearPlan, config: QuantConfig, *, perms: Mapping | None = None, stats=None,
         smooth: Mapping | None = None):
    """Quantize the planned linears of (already absorbed) float ``params`` -> packed params.

    Rotating methods rotate the weights offline by the block Hadamard; SmoothQuant scales them by ``smooth``; W4A4
    linears get an :class:`~pqjax.formats.ActQuant` whose NVFP4 scale comes from the calibration ``stats``. Without
    ``stats`` the activation scale is a placeholder (amax 8: any finite value), for byte counts and timing."""
    perms, smooth = perms or {}, smooth or {}
    fmt, g = config.format, config.group
    site_of = {c: s for s in plan.sites for c in s.consumers}
    act_of: dict = {}
    for p in plan.quantized:
        lin = dict(S.get_path(params, p))
        w = jnp.asarray(lin["kernel"], jnp.float32)
        perm = perms.get(site_of[p].name) if p in site_of else None
        rotate = config.rotates and plan.modes[p] == "w4a4"
        sm = smooth.get(p)
        rows = None
        if stats is not None:
            rows = stats[plan.tap_of[p]].rows
            rows = rows if perm is None else rows[:, perm]
        if sm is not None:  # smoothing factors were computed in the original channel order
            sm = sm if perm is None else sm[perm]
            w = w * sm[:, None]
            rows = None if rows is None else rows / sm[None]
        if rotate:
            w = formats.block_hadamard(w, g, axis=0)
        qt = formats.quantize(w, fmt, axis=0, group_size=None if fmt == "nvfp4" else g)
        lin["kernel"] = dataclasses.replace(qt, dtype=jnp.dtype(lin["kernel"].dtype).name)  # dequantize() -> model dtype
        if plan.modes[p] == "w4a4":  # one ActQuant per tapped input: the model quantizes a site's input once
            tap = plan.tap_of[p]
            if tap not in act_of:
                amax = 8.0 if stats is None else act_amax(stats[tap], rows, sm, rotate, g)
                act_of[tap] = formats.ActQuant(
                    global_scale=jnp.float32(amax / formats.NVFP4_RANGE if fmt == "nvfp4" else 1.0),
                    smooth=None if sm is None else (1.0 / sm).astype(jnp.float32), hadamard=rotate)
            lin["act_quant"] = act_of[tap]
        params = S.set_path(params, p, lin)
    return jax.tree.map(jnp.asarray, params)
