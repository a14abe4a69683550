"""``quantize_site``: quantize the linears that read one activation ("site"), choosing the transform per site.

Model-agnostic (FLUX uses the same function): give it the site's calibration rows ``x [n, K]`` and the Flax-layout
kernels ``[K, N_i]`` that read them; it returns deployable params::

    sq = pqjax.quantize_site(x, [w_q, w_k, w_v], config=SiteQuantConfig(format="int4", method="auto"))
    y_i = pqjax.models.layers.dense(sq.linears[i], x if sq.perm is None else x[:, sq.perm])   # deployment

A *candidate* is a channel transform, applied to the activation and absorbed into the kernels' rows, plus
weight-rounding options that keep the stored format standard:

* transforms: ``identity``; ``perm`` (PermuQuant: the best alpha of :func:`pqjax.permute.search_site`, kept only
  if it lowers the plain-rounding error by more than ``tau``); ``hadamard`` (block-diagonal Hadamard of the
  group size, activations rotated online by the kernel's quantize step, weights offline); ``perm+hadamard``.
* options: ``gptq`` (:mod:`pqjax.gptq`, Hessian ``X^T X`` of the site's calibration rows in the candidate's
  final channel order), ``4/6`` (NVFP4 Four Over Six weight block scales), ``clip`` (INT per-group MSE clip
  search; inside GPTQ it is chosen when the group starts).

``method`` picks the transform: ``rtn`` (identity), ``permuquant``, ``hadamard``, ``permuquant-h`` or ``auto``.
``auto`` evaluates identity, perm, hadamard and perm+hadamard, each with every option that applies to the format
switched on and again with all options off, and keeps the candidate with the lowest calibration error
``E = sum_i ||X W_i + b_i - dense(linear_i, X P)||^2`` (the real deployment path, so what is compared is what
runs). The options-off identity is plain RTN, so ``auto`` is never above RTN, nor above any single candidate, on
calibration data. The report lists every candidate's E.

Activation Four Over Six is not offered here yet: the deployment path (``ActQuant`` + ``pallas_kernels``) has no
switch for it until the kernels' activation-quantize pass gains one; :func:`pqjax.formats.nvfp4_block_quant`
with ``four_over_six=True`` is its reference.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import formats
from pqjax.gptq import DEFAULT_BLOCK, DEFAULT_DAMP, gptq_quantize
from pqjax.gptq import hessian as xtx
from pqjax.formats import ActQuant, block_hadamard, resolve_group
from pqjax.models.layers import dense
from pqjax.permute import DEFAULT_ALPHA_GRID, search_site

__all__ = ["SITE_METHODS", "SiteQuantConfig", "SiteQuant", "SiteQuantReport", "quantize_site", "site_output_error"]

SITE_METHODS = ("auto", "rtn", "permuquant", "hadamard", "permuquant-h")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SiteQuantConfig:
    """How :func:`quantize_site` quantizes one site (phase 2 merges these fields into ``pqjax.QuantConfig``).

    format: "nvfp4" | "int4" | "int3"; group_size: INT group (32/64/128, default 64; NVFP4 uses 16).
    method: one of :data:`SITE_METHODS` (module doc).
    gptq / four_over_six / clip_search: weight-rounding options; ``None`` means "on for method='auto' where the
      format has it" (4/6: NVFP4 only; clip: INT only), off otherwise. ``True`` for an option the format lacks
      is an error.
    act_quant: True for W4A4 linears (activations quantized in the format), False for weight-only W4A16 (no
      Hadamard candidates then: the weight-only path has no online rotation).
    alpha_grid / tau: PermuQuant's score exponents and acceptance threshold (:func:`pqjax.permute.search_site`).
    clip_grid: clip ratios of the INT clip search. damp / gptq_block: GPTQ damping (fraction of the mean Hessian
      diagonal) and lazy-update block.
    """

    format: str = "nvfp4"
    method: str = "auto"
    group_size: int | None = None
    gptq: bool | None = None
    four_over_six: bool | None = None
    clip_search: bool | None = None
    act_quant: bool = True
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    tau: float = 0.0
    clip_grid: tuple[float, ...] = formats.DEFAULT_CLIP_GRID
    damp: float = DEFAULT_DAMP
    gptq_block: int = DEFAULT_BLOCK

    def __post_init__(self):
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        object.__setattr__(self, "clip_grid", tuple(float(r) for r in self.clip_grid))
        if self.format not in formats.FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {formats.FORMATS}")
        if self.method not in SITE_METHODS:
            raise ValueError(f"unknown site method {self.method!r}; expected one of {SITE_METHODS}")
        resolve_group(self.format, self.group_size)
        if self.format == "nvfp4" and self.group_size not in (None, formats.NVFP4_BLOCK):
            raise ValueError(f"nvfp4 uses blocks of {formats.NVFP4_BLOCK}; group_size={self.group_size} is invalid")
        if self.format != "nvfp4" and self.group_size not in (None, *formats.INT_GROUP_SIZES):
            raise ValueError(f"group_size must be one of {formats.INT_GROUP_SIZES} for {self.format}")
        if self.four_over_six and self.format != "nvfp4":
            raise ValueError(f"four_over_six applies to nvfp4 only, not {self.format}")
        if self.clip_search and self.format == "nvfp4":
            raise ValueError("clip_search applies to int4 / int3 only, not nvfp4")
        if not self.act_quant and self.method in ("hadamard", "permuquant-h"):
            raise ValueError(f"method {self.method!r} rotates activations online: it needs act_quant=True (W4A4)")

    @property
    def group(self) -> int:
        return resolve_group(self.format, self.group_size)

    def options(self) -> tuple[str, ...]:
        """The weight-rounding options that are on, in label order (e.g. ``("gptq", "4/6")``)."""
        auto = self.method == "auto"
        on = lambda v, applies: applies and (auto if v is None else bool(v))
        opts = []
        if on(self.gptq, True):
            opts.append("gptq")
        if on(self.four_over_six, self.format == "nvfp4"):
            opts.append("4/6")
        if on(self.clip_search, self.format != "nvfp4"):
            opts.append("clip")
        return tuple(opts)


@dataclasses.dataclass(frozen=True)
class SiteQuantReport:
    """What :func:`quantize_site` chose and why: every candidate's calibration error E (label -> E)."""

    site: str
    k: int
    format: str
    method: str
    chosen: str
    alpha: float | None
    errors: dict
    e_rtn: float
    damping: float | None = None

    @property
    def e_chosen(self) -> float:
        return self.errors[self.chosen]

    @property
    def gain(self) -> float:
        """Relative calibration-error reduction of the chosen candidate vs plain RTN."""
        return (self.e_rtn - self.e_chosen) / self.e_rtn if self.e_rtn > 0 else 0.0

    def __str__(self) -> str:
        alts = ", ".join(f"{k} {v:.4g}" for k, v in sorted(self.errors.items(), key=lambda kv: kv[1]))
        return (f"{self.site} (K={self.k}, {self.format}, {self.method}): {self.chosen}, E {self.e_chosen:.4g} vs "
                f"RTN {self.e_rtn:.4g} ({-100 * self.gain:+.1f}%); candidates: {alts}")


@dataclasses.dataclass(frozen=True)
class SiteQuant:
    """``perm``: int array [K] read from the activation (new channel j = old channel perm[j]), or None.
    ``linears``: one params dict per kernel (``kernel`` QTensor, ``bias``, ``act_quant`` for W4A4).
    ``report``: :class:`SiteQuantReport`."""

    perm: np.ndarray | None
    linears: list
    report: SiteQuantReport


@dataclasses.dataclass(frozen=True)
class _Transform:
    name: str
    perm: np.ndarray | None
    hadamard: bool
    alpha: float | None = None


def _label(t: _Transform, opts: Sequence[str]) -> str:
    return "+".join((t.name,) + tuple(opts))


@jax.jit
def _sq_error(linear, x, ref):
    return jnp.sum(jnp.square(dense(linear, x).astype(jnp.float32) - ref))


def _float_output(x, w, b):
    y = jnp.dot(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), precision=_HI)
    return y if b is None else y + jnp.asarray(b, jnp.float32)


def site_output_error(sq: SiteQuant, x_rows, kernels, biases=None) -> float:
    """``sum_i ||X W_i + b_i - dense(sq.linears[i], X P)||^2`` (float64 sum of fp32 terms) for rows in the original
    channel order: the deployment error of a quantized site on any data (calibration or held out)."""
    xs = _per_kernel(x_rows, len(kernels))
    biases = [None] * len(kernels) if biases is None else list(biases)
    total = 0.0
    for x, w, b, lin in zip(xs, kernels, biases, sq.linears):
        x = jnp.asarray(x, jnp.float32)
        xp = x if sq.perm is None else jnp.take(x, jnp.asarray(sq.perm), axis=1)
        total += float(_sq_error(lin, xp, _float_output(x, w, b)))
    return total


def _per_kernel(x_rows, n: int) -> list:
    return list(x_rows) if isinstance(x_rows, (list, tuple)) else [x_rows] * n


def _rotate_rows(x, g):
    return block_hadamard(jnp.asarray(x, jnp.float32), g, axis=-1)


def _transform_hessian(h, t: _Transform, g: int):
    h = jnp.asarray(h, jnp.float32)
    if t.perm is not None:
        p = jnp.asarray(t.perm)
        h = h[p][:, p]
    if t.hadamard:  # R^T H R with R the (symmetric) block Hadamard
        h = block_hadamard(block_hadamard(h, g, axis=0), g, axis=1)
    return h


def _build(t: _Transform, opts, xs, kernels, biases, hessians, act_amaxes, cfg: SiteQuantConfig, site: str):
    """Deployable linears of one candidate + the GPTQ damping used (None without GPTQ)."""
    g, fmt = cfg.group, cfg.format
    gs = None if fmt == "nvfp4" else g
    f46 = "4/6" in opts
    clip = cfg.clip_grid if "clip" in opts else None
    ws = []
    for w in kernels:
        w = jnp.asarray(w, jnp.float32)
        w = w if t.perm is None else w[jnp.asarray(t.perm)]
        ws.append(block_hadamard(w, g, axis=0) if t.hadamard else w)
    damping = None
    if "gptq" in opts:
        qts = [None] * len(ws)
        for idx in _kernels_by_input(xs).values():  # kernels reading the same rows share one GPTQ call
            h = _transform_hessian(hessians[idx[0]], t, g)
            res = gptq_quantize([ws[i] for i in idx], h, fmt=fmt, group_size=gs, four_over_six=f46,
                                     clip_grid=clip, damp=cfg.damp, block_size=cfg.gptq_block, site=site)
            damping = res.damping if damping is None else max(damping, res.damping)
            for i, q in zip(idx, res.qtensors):
                qts[i] = q
    else:
        qts = [formats.quantize(w, fmt, axis=0, group_size=gs, four_over_six=f46, clip_grid=clip) for w in ws]
    linears = []
    for i, (qt, b) in enumerate(zip(qts, biases)):
        lin = {"kernel": qt, "bias": None if b is None else jnp.asarray(b, jnp.float32)}
        if cfg.act_quant:
            amax = act_amaxes[i]
            if t.hadamard:  # a rotation mixes channels: the rotated rows' amax, scaled like the full calibration's
                x = jnp.asarray(xs[i], jnp.float32)
                x = x if t.perm is None else x[:, jnp.asarray(t.perm)]
                sample = float(jnp.max(jnp.abs(x)))
                amax = float(jnp.max(jnp.abs(_rotate_rows(x, g)))) * (amax / sample if sample > 0 else 1.0)
            gx = max(amax, 1e-30) / (formats.E2M1_MAX * formats.E4M3_MAX) if fmt == "nvfp4" else 1.0
            lin["act_quant"] = ActQuant(global_scale=jnp.float32(gx), hadamard=bool(t.hadamard))
        if lin["bias"] is None:
            del lin["bias"]
        linears.append(lin)
    return linears, damping


def _kernels_by_input(xs) -> dict:
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(id(x), []).append(i)
    return groups


def _check(x_rows, kernels, biases, hessian, cfg, site):
    kernels = [jnp.asarray(w) for w in kernels]
    if not kernels:
        raise ValueError(f"quantize_site (site {site}): no kernels given")
    xs = _per_kernel(x_rows, len(kernels))
    if len(xs) != len(kernels):
        raise ValueError(f"quantize_site (site {site}): {len(xs)} activation arrays for {len(kernels)} kernels")
    k = int(kernels[0].shape[0]) if kernels[0].ndim == 2 else -1
    for i, w in enumerate(kernels):
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"quantize_site (site {site}): kernel {i} has shape {tuple(w.shape)}, expected [K, N] "
                             f"with the K of kernel 0 ({k})")
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"quantize_site (site {site}): kernel {i} has non-finite weights")
    uniq = {id(x): jnp.asarray(x) for x in xs}
    for x in uniq.values():
        if x.ndim != 2 or x.shape[1] != k or x.shape[0] == 0:
            raise ValueError(f"quantize_site (site {site}): activation rows have shape {tuple(x.shape)}, "
                             f"expected [n >= 1, K={k}]")
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"quantize_site (site {site}): non-finite values in the activation rows")
    if k % cfg.group:
        raise ValueError(f"quantize_site (site {site}): K={k} is not a multiple of the {cfg.format} group size "
                         f"{cfg.group}")
    biases = [None] * len(kernels) if biases is None else list(biases)
    if len(biases) != len(kernels):
        raise ValueError(f"quantize_site (site {site}): {len(biases)} biases for {len(kernels)} kernels")
    for i, (b, w) in enumerate(zip(biases, kernels)):
        if b is not None and tuple(jnp.shape(b)) != (w.shape[1],):
            raise ValueError(f"quantize_site (site {site}): bias {i} has shape {tuple(jnp.shape(b))}, "
                             f"expected ({w.shape[1]},)")
    hs = None
    if hessian is not None:
        hs = _per_kernel(hessian, len(kernels))
        if len(hs) != len(kernels):
            raise ValueError(f"quantize_site (site {site}): {len(hs)} Hessians for {len(kernels)} kernels")
        for h in hs:
            if tuple(jnp.shape(h)) != (k, k):
                raise ValueError(f"quantize_site (site {site}): Hessian has shape {tuple(jnp.shape(h))}, "
                                 f"expected [K, K] = [{k}, {k}]")
    return xs, kernels, biases, hs, k


def quantize_site(x_rows, kernels, *, config: SiteQuantConfig = SiteQuantConfig(), biases=None, hessian=None,
                  act_amax=None, blocks=None, name: str = "site") -> SiteQuant:
    """Quantize one site -> :class:`SiteQuant` (see the module doc).

    x_rows: calibration activations ``[n, K]`` in the original channel order, or one array per kernel (a site
      whose consumers read different activations under one permutation, e.g. FLUX's P2).
    kernels: Flax-layout ``[K, N_i]`` weights reading the site; biases: optional ``[N_i]`` each.
    hessian: optional ``X^T X [K, K]`` (original order; one per kernel if x_rows is a list) accumulated over the
      whole calibration set; default: from ``x_rows``. act_amax: optional static activation amax from the whole
      calibration (one float, or one per kernel); default: from ``x_rows``.
    blocks: permutation constraint (contiguous blocks, see :func:`pqjax.permute.sorted_permutation`).
    name: the site's name, used in errors and the report.
    Raises ValueError naming the site for non-finite rows / kernels / Hessians, bad shapes, or a K that is not a
    multiple of the group.
    """
    cfg = config
    xs, kernels, biases, hs, k = _check(x_rows, kernels, biases, hessian, cfg, name)
    g = cfg.group
    opts = cfg.options()
    if hs is None and "gptq" in opts:
        cache: dict[int, jax.Array] = {}
        hs = [cache.setdefault(id(x), xtx(x)) for x in xs]
    if act_amax is None:
        act_amaxes = [float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)))) for x in xs]
    else:
        act_amaxes = [float(a) for a in np.broadcast_to(np.asarray(act_amax, np.float64), (len(kernels),))]

    search = functools.partial(search_site, xs, kernels, fmt=cfg.format, group_size=g, alpha_grid=cfg.alpha_grid,
                               tau=cfg.tau, blocks=blocks, act_quant=cfg.act_quant)
    ident = _Transform("identity", None, False)
    wanted = {"rtn": ["identity"], "permuquant": ["perm"], "hadamard": ["hadamard"],
              "permuquant-h": ["perm+hadamard"]}.get(cfg.method)
    if wanted is None:  # auto
        wanted = ["identity", "perm"] + (["hadamard", "perm+hadamard"] if cfg.act_quant else [])
    transforms = []
    for name_t in wanted:
        if name_t == "identity":
            transforms.append(ident)
        elif name_t == "hadamard":
            transforms.append(_Transform("hadamard", None, True))
        else:
            rot = name_t == "perm+hadamard"
            res = search(hadamard=rot)
            if res.accepted:
                transforms.append(_Transform(f"perm(a={res.alpha:g})" + ("+hadamard" if rot else ""),
                                             np.asarray(res.perm), rot, res.alpha))
            else:  # no permutation beat the identity order: this candidate is the unpermuted one
                transforms.append(_Transform("hadamard", None, True) if rot else ident)
    transforms = list({(t.name): t for t in transforms}.values())
    option_sets = [opts] if cfg.method != "auto" or not opts else [opts, ()]

    ref_err = functools.partial(site_output_error, x_rows=xs, kernels=kernels, biases=biases)
    errors, built = {}, {}
    for t in transforms:
        for o in option_sets:
            lab = _label(t, o)
            linears, damping = _build(t, o, xs, kernels, biases, hs, act_amaxes, cfg, name)
            sq = SiteQuant(t.perm, linears, None)
            errors[lab] = ref_err(sq)
            built[lab] = (t, linears, damping)
    rtn_label = _label(ident, ())
    if rtn_label in errors:
        e_rtn = errors[rtn_label]
    else:
        e_rtn = ref_err(SiteQuant(None, _build(ident, (), xs, kernels, biases, hs, act_amaxes, cfg, name)[0], None))
    chosen = min(errors, key=errors.get)
    t, linears, damping = built[chosen]
    report = SiteQuantReport(site=name, k=k, format=cfg.format, method=cfg.method, chosen=chosen, alpha=t.alpha,
                             errors=dict(errors), e_rtn=e_rtn, damping=damping)
    return SiteQuant(None if t.perm is None else np.asarray(t.perm, np.int32), linears, report)
