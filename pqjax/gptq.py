"""GPTQ weight rounding (Frantar et al., arXiv 2210.17323) for NVFP4 and INT per-group weights, in JAX.

GPTQ quantizes a linear's input channels (the K rows of a Flax kernel ``[K, N]``, the columns of ``W = kernel.T``)
one at a time and spreads each channel's rounding error over the channels not yet quantized, weighted by the
inverse Hessian of the layer's calibration input ``X [n, K]``, so that ``||X W - X Q||^2`` stays small::

    H  = X^T X + lambda I              lambda = damp * mean(diag(X^T X))   (1% by default)
    U  = upper Cholesky factor of H^-1                  (H^-1 = U^T U; U[j, :j] = 0)
    for j = 0 .. K-1:                                    (the site's FINAL channel order)
        q_j  = quant(w_j)                                 with the scale of j's group (see below)
        e_j  = (w_j - q_j) / U[j, j]
        w_i -= e_j * U[j, i]    for i > j

Lazy block updates (the paper's section 3.2): the loop runs over blocks of ``block_size`` (128) channels; inside
a block the updates are rank-1 on the block, the rest of the matrix gets one ``E_block @ U[block, :]`` product
per block. The scale of a quantization group is computed when GPTQ reaches the group's first channel, from the
group's CURRENT (already error-compensated) values:

* NVFP4: the e4m3 block scale of 16 channels, under the global scale of the whole weight, fixed beforehand
  (``nvfp4_global_scale`` of the weight; ``four_over_six`` chooses each block's scale between the amax -> 6 and
  amax -> 4 candidates on the current block, as :func:`pqjax.formats.nvfp4_block_quant` does).
* INT: the group scale, with :func:`pqjax.formats.int_clip_search` choosing the clip ratio when ``clip_grid`` is
  given (weight MSE of the current group).

(The reference implementation computes group scales from the matrix as it stood when the BLOCK started, which
misses the in-block updates; we use the current values.) The output is an ordinary packed
:class:`pqjax.formats.QTensor`. Rows (output channels) are independent given ``U``: the kernels that read one
site are quantized in one call (their rows concatenated, each kernel keeping its own NVFP4 global scale).

Memory: ``H``, ``H^-1`` and ``U`` are K x K fp32 (FLUX.1-dev's largest site, K = 12288: 600 MB each): quantize
one site at a time. Everything is jitted; one compile per (shape, format, options).

Channels the calibration never activated (``H[i, i] <= 0``) get the mean curvature of the others on the
diagonal (the reference implementation uses 1), and their weights are kept (quantized by plain rounding) rather
than zeroed: held-out data may use them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pqjax import formats

__all__ = ["DEFAULT_DAMP", "DEFAULT_BLOCK", "hessian", "inverse_cholesky", "gptq_codes", "gptq_quantize",
           "GPTQResult"]

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
_HI = lax.Precision.HIGHEST
_DAMP_RETRIES = 3  # damping x10 per retry when the damped Hessian is still not positive definite in fp32


@functools.partial(jax.jit, static_argnames="chunk")
def _hessian(x, chunk):
    n, k = x.shape
    pad = (-n) % chunk
    xc = jnp.pad(x.astype(jnp.float32), ((0, pad), (0, 0))).reshape(-1, chunk, k)

    def body(h, xi):
        return h + jnp.dot(xi.T, xi, precision=_HI), None

    h, _ = lax.scan(body, jnp.zeros((k, k), jnp.float32), xc)
    return h


def hessian(x_rows, chunk: int = 1024) -> jax.Array:
    """``X^T X`` in fp32 (rows accumulated ``chunk`` at a time) of calibration rows ``X [n, K]``."""
    x = jnp.asarray(x_rows)
    if x.ndim != 2:
        raise ValueError(f"hessian: expected rows [n, K], got shape {tuple(x.shape)}")
    return _hessian(x, min(int(chunk), max(int(x.shape[0]), 1)))


@jax.jit
def _upper_inverse_cholesky(h, lam, dead_curvature):
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    d = jnp.diag(h)
    h = h + jnp.diag(jnp.where(d <= 0, dead_curvature - d, 0.0) + lam)  # dead channels: the mean curvature
    low = jnp.linalg.cholesky(h)
    low_inv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)
    hinv = jnp.dot(low_inv.T, low_inv, precision=_HI)
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.linalg.cholesky(hinv).T


def inverse_cholesky(h, *, damp: float = DEFAULT_DAMP, site: str = "?") -> tuple[jax.Array, float]:
    """``(U, lambda)``: the upper Cholesky factor of ``(H + lambda I)^-1`` in fp32 and the damping used.

    ``lambda = damp * mean(diag(H))`` (over the channels with a positive diagonal); when fp32 Cholesky still
    fails (an ill-conditioned or singular ``H``), the damping is raised tenfold up to three times. A non-finite,
    non-square or non-PSD ``H`` that no damping fixes raises ValueError naming ``site``.
    """
    h = jnp.asarray(h, jnp.float32)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"GPTQ (site {site}): Hessian must be square [K, K], got shape {tuple(h.shape)}")
    if not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError(f"GPTQ (site {site}): the Hessian X^T X has non-finite entries (NaN/Inf in the "
                         f"calibration activations?)")
    if not damp >= 0:
        raise ValueError(f"GPTQ (site {site}): damp must be >= 0, got {damp}")
    diag = np.asarray(jnp.diag(h), np.float64)
    # fp32 rounding can leave a silent channel's (e.g. a rotated zero-mean direction) diagonal at -tiny; beyond
    # 1e-3 of the largest (more than 16k terms' worth of u = 2^-24) it is not a Gram matrix
    if np.any(diag < -1e-3 * max(float(diag.max()), 0.0)) or float(diag.max()) < 0:
        raise ValueError(f"GPTQ (site {site}): the Hessian has negative diagonal entries (not X^T X)")
    live = diag > 0
    mean = float(np.mean(diag[live])) if live.any() else 1.0
    lam = damp * mean
    for _ in range(_DAMP_RETRIES + 1):
        u = _upper_inverse_cholesky(h, jnp.float32(lam), jnp.float32(mean))
        if bool(jnp.all(jnp.isfinite(u))):
            return u, lam
        lam = max(lam, 1e-6 * mean) * 10.0
    raise ValueError(f"GPTQ (site {site}): the Hessian is not positive semi-definite; Cholesky failed even with "
                     f"damping {lam / 10.0:.3g} (= {lam / 10.0 / mean:.3g} x mean diagonal)")


def _group_of(fmt: str, group_size: int | None) -> int:
    if fmt not in formats.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {formats.FORMATS}")
    if fmt == "nvfp4":
        return formats.NVFP4_BLOCK
    g = formats.DEFAULT_INT_GROUP if group_size is None else int(group_size)
    if g not in formats.INT_GROUP_SIZES:
        raise ValueError(f"{fmt} group_size must be one of {formats.INT_GROUP_SIZES}, got {group_size}")
    return g


def _block_size(k: int, g: int, block: int) -> int:
    """Largest multiple of the group that divides K and is <= block (at least one group)."""
    d = max(1, block // g)
    while (k // g) % d:
        d -= 1
    return g * d


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "four_over_six", "clip_grid", "block_size",
                                             "scale_dtype"))
def _gptq(w, u, gscale, *, fmt, group_size, four_over_six, clip_grid, block_size, scale_dtype):
    n, k = w.shape
    g, bsz = group_size, block_size
    nvfp4 = fmt == "nvfp4"
    bits = formats.FORMAT_BITS[fmt]
    sdt = jnp.dtype(jnp.float8_e4m3fn if nvfp4 else scale_dtype)

    def group_scale(wg):  # [N, g] current values -> [N] scale (stored dtype)
        if nvfp4:
            _, s = formats.nvfp4_block_quant(wg, gscale[:, None, None], four_over_six)
        elif clip_grid is None:
            _, s = formats.int_group_quant(wg, bits, g, sdt)
        else:
            _, s, _ = formats.int_clip_search(wg, bits, g, sdt, clip_grid)
        return s[:, 0]

    def quant(wc, sf):  # one channel [N] under f32 scales [N] -> (code, dequantized value), f32
        if nvfp4:
            c = formats.nvfp4_encode(formats.div_by_scale(wc, gscale), sf)
            return c.astype(jnp.float32), (formats.e2m1_decode(c) * sf) * gscale
        q = formats.int_encode(wc, sf, bits)
        return q, q * sf

    def block(b, carry):
        wcur, codes, scales = carry
        i1 = b * bsz
        w1 = lax.dynamic_slice(wcur, (0, i1), (n, bsz))
        u1 = lax.dynamic_slice(u, (i1, i1), (bsz, bsz))

        def group(gi, c):
            w1, q1, e1, s1 = c
            j0 = gi * g
            s = group_scale(lax.dynamic_slice(w1, (0, j0), (n, g)))
            sf = s.astype(jnp.float32)

            def column(jj, c2):
                w1, q1, e1 = c2
                j = j0 + jj
                wc = lax.dynamic_slice(w1, (0, j), (n, 1))[:, 0]
                q, deq = quant(wc, sf)
                err = (wc - deq) / u1[j, j]
                # rank-1 update of the block; U is upper triangular, so finished channels (< j) are untouched
                w1 = w1 - err[:, None] * lax.dynamic_slice(u1, (j, 0), (1, bsz))
                q1 = lax.dynamic_update_slice(q1, q[:, None], (0, j))
                e1 = lax.dynamic_update_slice(e1, err[:, None], (0, j))
                return w1, q1, e1

            w1, q1, e1 = lax.fori_loop(0, g, column, (w1, q1, e1))
            return w1, q1, e1, lax.dynamic_update_slice(s1, s[:, None], (0, gi))

        zeros = jnp.zeros((n, bsz), jnp.float32)
        s1 = jnp.zeros((n, bsz // g), sdt)
        _, q1, e1, s1 = lax.fori_loop(0, bsz // g, group, (w1, zeros, zeros, s1))
        # lazy update of every later channel; channels < i1 + bsz are finished and never read again
        wcur = wcur - jnp.dot(e1, lax.dynamic_slice(u, (i1, 0), (bsz, k)), precision=_HI)
        codes = lax.dynamic_update_slice(codes, q1, (0, i1))
        scales = lax.dynamic_update_slice(scales, s1, (0, i1 // g))
        return wcur, codes, scales

    init = (w.astype(jnp.float32), jnp.zeros((n, k), jnp.float32), jnp.zeros((n, k // g), sdt))
    _, codes, scales = lax.fori_loop(0, k // bsz, block, init)
    return codes.astype(jnp.uint8 if nvfp4 else jnp.int8), scales


def gptq_codes(w_rows, u, *, fmt: str, group_size: int | None = None, global_scale=None,
               four_over_six: bool = False, clip_grid=None, block_size: int = DEFAULT_BLOCK,
               scale_dtype=jnp.bfloat16):
    """The GPTQ loop on ``w_rows [N, K]`` (rows = output channels) with a precomputed ``U`` (:func:`inverse_cholesky`).

    Returns unpacked ``(codes [N, K], scales [N, K // group])``: uint8 e2m1 codes + e4m3 scales (nvfp4, under
    ``global_scale`` [N] or scalar, fp32) or int8 codes + ``scale_dtype`` scales (int4 / int3).
    """
    w = jnp.asarray(w_rows, jnp.float32)
    n, k = w.shape
    g = _group_of(fmt, group_size)
    if k % g:
        raise ValueError(f"GPTQ: K={k} is not a multiple of the {fmt} group size {g}")
    if tuple(jnp.shape(u)) != (k, k):
        raise ValueError(f"GPTQ: U has shape {tuple(jnp.shape(u))}, expected [K, K] = [{k}, {k}]")
    if fmt == "nvfp4":
        gs = jnp.broadcast_to(jnp.asarray(global_scale, jnp.float32), (n,))
    else:
        if global_scale is not None or four_over_six:
            raise ValueError(f"GPTQ: global_scale / four_over_six apply to nvfp4 only, not {fmt}")
        gs = jnp.ones((n,), jnp.float32)
    if clip_grid is not None and fmt == "nvfp4":
        raise ValueError("GPTQ: clip_grid applies to int4 / int3 only, not nvfp4")
    return _gptq(w, jnp.asarray(u, jnp.float32), gs, fmt=fmt, group_size=g, four_over_six=bool(four_over_six),
                 clip_grid=None if clip_grid is None else tuple(float(r) for r in clip_grid),
                 block_size=_block_size(k, g, int(block_size)), scale_dtype=jnp.dtype(scale_dtype).name)


@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """Output of :func:`gptq_quantize`: one QTensor per kernel (Flax layout [K, N_i], axis 0) and the damping used."""

    qtensors: list
    damping: float


def gptq_quantize(kernels: Sequence, h, *, fmt: str, group_size: int | None = None, four_over_six: bool = False,
                  clip_grid=None, damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK, site: str = "?",
                  scale_dtype=jnp.bfloat16) -> GPTQResult:
    """GPTQ-quantize the Flax kernels ``[K, N_i]`` that read one site with that site's Hessian ``h = X^T X [K, K]``.

    Both must already be in the site's final channel order (after permutation and rotation). Each NVFP4 kernel
    keeps its own global scale (``nvfp4_global_scale(kernel, four_over_six)``). Returns a :class:`GPTQResult`
    whose QTensors use the standard packed format (``dequantize()`` gives the GPTQ weights). Non-finite kernels
    or Hessians raise ValueError naming ``site``.
    """
    kernels = [jnp.asarray(w, jnp.float32) for w in kernels]
    if not kernels:
        raise ValueError(f"GPTQ (site {site}): no kernels given")
    k = int(kernels[0].shape[0])
    for i, w in enumerate(kernels):
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"GPTQ (site {site}): kernel {i} has shape {tuple(w.shape)}, expected [K={k}, N]")
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"GPTQ (site {site}): kernel {i} has non-finite weights")
    if tuple(jnp.shape(h)) != (k, k):
        raise ValueError(f"GPTQ (site {site}): Hessian has shape {tuple(jnp.shape(h))}, expected [K, K] = [{k}, {k}]")
    g = _group_of(fmt, group_size)
    if k % g:
        raise ValueError(f"GPTQ (site {site}): K={k} is not a multiple of the {fmt} group size {g}")
    u, lam = inverse_cholesky(h, damp=damp, site=site)
    rows = jnp.concatenate([w.T for w in kernels], axis=0)
    gsc = None
    if fmt == "nvfp4":
        gks = [formats.nvfp4_global_scale(w, four_over_six) for w in kernels]
        gsc = jnp.concatenate([jnp.full((w.shape[1],), gk, jnp.float32) for w, gk in zip(kernels, gks)])
    codes, scales = gptq_codes(rows, u, fmt=fmt, group_size=group_size, global_scale=gsc,
                               four_over_six=four_over_six, clip_grid=clip_grid, block_size=block_size,
                               scale_dtype=scale_dtype)
    out, start = [], 0
    for i, w in enumerate(kernels):
        n = int(w.shape[1])
        c, s = codes[start:start + n], scales[start:start + n]
        packed = formats.pack_3bit(c) if fmt == "int3" else formats.pack_4bit(c)
        out.append(formats.QTensor(packed, s, gks[i] if fmt == "nvfp4" else None, fmt=fmt, group_size=g,
                                   shape=(k, n), axis=0, dtype="float32"))
        start += n
    return GPTQResult(out, lam)
