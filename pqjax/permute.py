"""PermuQuant's search for one site: joint second-moment scores, vectorized alpha search, acceptance.

A *site* is one activation that several linears read (Q/K/V, an FFN input, ...). For a permutation P of its K
channels, ``X W = (X P)(P^T W)``; PermuQuant picks P so that channels with similar statistics share a
quantization group:

    v_i(alpha) = mu2_a[i]^alpha * mu2_w[i]^(1 - alpha)          (sorted descending -> P_alpha)
    E(P)       = sum_i || X W_i - Q_a(X P) Q_w(P^T W_i) ||^2      (deployment quantizers, sampled rows X)
    accept P*  = argmin_alpha E(P_alpha)  iff  (E(I) - E(P*)) / E(I) > tau

Every candidate (the identity and one permutation per alpha) is evaluated at once with ``jax.vmap``.
PermuQuant-H rotates by a block-diagonal Hadamard of the group size after the permutation
(:func:`pqjax.formats.block_hadamard`), for every candidate including the identity (weights offline, activations
online). This module is model-agnostic: it knows nothing
about FLUX (see ``pqjax.sites`` for that).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import formats

DEFAULT_ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class SiteResult:
    """Outcome of :func:`search_site`. ``perm`` is the identity when not accepted; ``alpha`` is the best candidate's
    alpha (None if the identity itself was best); ``errors`` holds E for [identity, *alpha_grid]."""

    perm: np.ndarray
    alpha: float | None
    accepted: bool
    e_orig: float
    e_best: float
    errors: tuple[float, ...] = ()

    @property
    def gain(self) -> float:
        return (self.e_orig - self.e_best) / self.e_orig if self.e_orig > 0 else 0.0


# ---------------------------------------------------------------------------------------------- scores

def weight_second_moment(kernels: Sequence[jax.Array]) -> jax.Array:
    """mu2_w[i] = mean over every output row of every kernel reading the site of W[i, :]^2 (Flax layout [K, N])."""
    sq = sum(jnp.sum(jnp.square(jnp.asarray(w, jnp.float32)), axis=1) for w in kernels)
    return sq / sum(int(w.shape[1]) for w in kernels)


def sorted_permutation(scores: jax.Array, blocks: Sequence[int] | None = None) -> jax.Array:
    """Descending argsort of ``scores`` [..., K], independently inside each contiguous block (None: one block).

    Blocks express the site's constraint: within-head (P2) is ``(head_dim,) * heads``; FLUX's single-block
    proj_out input is ``(head_dim,) * heads + (mlp_hidden,)``.
    """
    k = scores.shape[-1]
    blocks = (k,) if blocks is None else tuple(int(b) for b in blocks)
    if sum(blocks) != k:
        raise ValueError(f"permutation blocks {blocks} do not cover K={k}")
    out, start = [], 0
    for b in blocks:  # few distinct blocks; equal ones could be batched, but sorting is not the cost here
        out.append(start + jnp.argsort(-scores[..., start:start + b], axis=-1, stable=True))
        start += b
    return jnp.concatenate(out, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("alpha_grid", "blocks"))
def candidate_permutations(mu2_a, mu2_w, alpha_grid, blocks=None) -> jax.Array:
    """[1 + len(alpha_grid), K]: the identity, then the descending order of v(alpha) for each alpha."""
    la = jnp.log(jnp.asarray(mu2_a, jnp.float32) + _TINY)
    lw = jnp.log(jnp.asarray(mu2_w, jnp.float32) + _TINY)
    alphas = jnp.asarray(alpha_grid, jnp.float32)[:, None]
    log_v = alphas * la[None] + (1.0 - alphas) * lw[None]  # log of mu2_a^alpha * mu2_w^(1-alpha)
    perms = sorted_permutation(log_v, blocks)
    ident = jnp.arange(la.shape[0], dtype=jnp.int32)[None]
    return jnp.concatenate([ident, perms], axis=0)


# ---------------------------------------------------------------------------------------------- error

def quantized_product(x, w, *, fmt, group_size, hadamard=False, act_quant=True, act_global_scale=None,
                      w_global_scale=None):
    """``Q_a(x) Q_w(w)`` in fp32 with the deployment quantizers (x [n, K] already permuted, w [K, N]).

    NVFP4 global scales default to the operands' own amax; pass ``w_global_scale`` when ``w`` is a column slice."""
    g = formats.resolve_group(fmt, group_size)
    if hadamard:
        x, w = formats.block_hadamard(x, g, axis=-1), formats.block_hadamard(w, g, axis=0)
    gs = None if fmt == "nvfp4" else g
    if act_quant:
        x = formats.fake_quant(x, fmt, group_size=gs, axis=-1,
                               global_scale=act_global_scale if fmt == "nvfp4" else None)
    wq = formats.fake_quant(w, fmt, group_size=gs, axis=0, global_scale=w_global_scale if fmt == "nvfp4" else None)
    return jnp.dot(x.astype(jnp.float32), wq.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def site_error(perm, xs, kernels, *, fmt, group_size, hadamard=False, act_quant=True, act_global_scales=None,
               w_global_scales=None):
    """E(P) = sum_i ||X_i W_i - Q_a(X_i P) Q_w(P^T W_i)||^2 (fp32)."""
    total = jnp.float32(0)
    for i, (x, w) in enumerate(zip(xs, kernels)):
        x = jnp.asarray(x, jnp.float32)
        w = jnp.asarray(w, jnp.float32)
        ref = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
        gsc = None if act_global_scales is None else act_global_scales[i]
        wsc = None if w_global_scales is None else w_global_scales[i]
        y = quantized_product(jnp.take(x, perm, axis=1), jnp.take(w, perm, axis=0), fmt=fmt, group_size=group_size,
                              hadamard=hadamard, act_quant=act_quant, act_global_scale=gsc, w_global_scale=wsc)
        total = total + jnp.sum(jnp.square(ref - y))
    return total


def _errors(perms, xs, kernels, act_global_scales, w_global_scales, *, fmt, group_size, hadamard, act_quant):
    f = lambda p: site_error(p, xs, kernels, fmt=fmt, group_size=group_size, hadamard=hadamard,
                             act_quant=act_quant, act_global_scales=act_global_scales,
                             w_global_scales=w_global_scales)
    return jax.vmap(f)(perms)


_errors_jit = jax.jit(_errors, static_argnames=("fmt", "group_size", "hadamard", "act_quant"))


# ---------------------------------------------------------------------------------------------- search

def search_site(x_rows, kernels, *, fmt, group_size=None, alpha_grid=DEFAULT_ALPHA_GRID, tau=0.0, hadamard=False,
                blocks=None, mu2_a=None, act_quant=True, act_global_scales=None,
                chunk_cols: int = 4096) -> SiteResult:
    """PermuQuant search for one site.

    x_rows: [n, K] sampled activations read by every kernel, or a sequence with one [n_i, K] array per kernel (for a
      site whose consumers read different activations with a shared permutation, e.g. FLUX's P2).
    kernels: Flax-layout [K, N_i] weights reading the site.
    fmt / group_size: deployment format ("nvfp4" uses blocks of 16; INT defaults to 64).
    alpha_grid: exponents of the joint score; tau: acceptance threshold on the relative gain.
    hadamard: PermuQuant-H (block Hadamard of the group size after the permutation, for every candidate).
    blocks: permutation constraint (sorted within contiguous blocks; see :func:`sorted_permutation`).
    mu2_a: per-channel activation second moment from calibration (default: from ``x_rows``).
    act_quant: False for weight-only (W4A16) sites. act_global_scales: static NVFP4 activation scales, one per kernel.
    chunk_cols: output columns evaluated at once (memory bound; the result does not depend on it beyond fp32 sums).
    """
    kernels = [jnp.asarray(w) for w in kernels]
    if not kernels:
        raise ValueError("search_site: no kernels given")
    xs = list(x_rows) if isinstance(x_rows, (list, tuple)) else [x_rows] * len(kernels)
    if len(xs) != len(kernels):
        raise ValueError(f"search_site: {len(xs)} activation arrays for {len(kernels)} kernels")
    k = int(kernels[0].shape[0])
    for i, (x, w) in enumerate(zip(xs, kernels)):
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"search_site: kernel {i} has shape {tuple(w.shape)}, expected [K={k}, N]")
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"search_site: activations {i} have shape {tuple(x.shape)}, expected [n, K={k}]")
    g = formats.resolve_group(fmt, group_size)
    if k % g:
        raise ValueError(f"search_site: K={k} is not a multiple of the {fmt} group size {g}")
    if not all(np.isfinite(np.asarray(x)).all() for x in xs):
        raise ValueError("search_site: non-finite values in the activation rows")
    if mu2_a is None:
        mu2_a = sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)), 0) for x in xs) / sum(x.shape[0] for x in xs)
    perms = candidate_permutations(mu2_a, weight_second_moment(kernels), tuple(alpha_grid),
                                   None if blocks is None else tuple(blocks))
    scales = [None] * len(kernels) if act_global_scales is None else \
        [jnp.asarray(s, jnp.float32) for s in act_global_scales]
    # E is a sum over output columns and weights are quantized per output row: evaluating column chunks one at a
    # time is exact and bounds memory (all candidates of one chunk are live at once)
    errs = np.zeros(perms.shape[0], np.float64)
    for x, w, sc in zip(xs, kernels, scales):
        x = jnp.asarray(x, jnp.float32)
        # NVFP4 weight global scale of the whole tensor (not of a chunk). With a Hadamard rotation the rotated amax
        # depends a little on the candidate; the identity's is used: it only positions the e4m3 block-scale range.
        wsc = [formats.nvfp4_global_scale(w)]
        if hadamard and fmt == "nvfp4":
            wsc = [formats.nvfp4_global_scale(formats.block_hadamard(jnp.asarray(w, jnp.float32), g, axis=0))]
        for start in range(0, w.shape[1], chunk_cols):
            e = _errors_jit(perms, [x], [w[:, start:start + chunk_cols]], None if sc is None else [sc], wsc, fmt=fmt,
                            group_size=g, hadamard=bool(hadamard), act_quant=bool(act_quant))
            errs += np.asarray(e, np.float64)
    best = int(np.argmin(errs))
    e_orig, e_best = float(errs[0]), float(errs[best])
    gain = (e_orig - e_best) / e_orig if e_orig > 0 else 0.0
    accepted = best != 0 and gain > tau
    perm = np.asarray(perms[best] if accepted else perms[0])
    alpha = None if best == 0 else float(alpha_grid[best - 1])
    return SiteResult(perm=perm, alpha=alpha, accepted=accepted, e_orig=e_orig, e_best=e_best,
                      errors=tuple(float(e) for e in errs))
