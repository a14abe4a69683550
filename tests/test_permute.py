"""search_site against a brute-force float64 numpy search, acceptance semantics, constraints, Hadamard, bad input."""
import numpy as np
import pytest

from pqjax.formats import block_hadamard, hadamard_matrix
from pqjax.permute import search_site

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _int_fq(x, bits, g, axis):
    """float64 numpy symmetric per-group fake quant along axis (scale rounded to bf16 like pqjax's INT format)."""
    import ml_dtypes
    x = np.moveaxis(x, axis, -1)
    xg = x.reshape(*x.shape[:-1], -1, g)
    qmax = 2 ** (bits - 1) - 1
    s = (np.abs(xg).max(-1, keepdims=True) / qmax).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    q = np.where(s > 0, np.clip(np.round(xg / np.where(s > 0, s, 1)), -qmax, qmax), 0)
    return np.moveaxis((q * s).reshape(x.shape), -1, axis)


def _brute_force(x, ws, bits, g, alphas, blocks=None):
    x = x.astype(np.float64)
    mu2a = np.mean(x ** 2, 0)
    mu2w = sum((w.astype(np.float64) ** 2).sum(1) for w in ws) / sum(w.shape[1] for w in ws)
    k = x.shape[1]
    cands = [np.arange(k)]
    for a in alphas:
        v = a * np.log(mu2a + 1e-30) + (1 - a) * np.log(mu2w + 1e-30)
        blocks_ = blocks or (k,)
        perm, start = [], 0
        for b in blocks_:
            perm.append(start + np.argsort(-v[start:start + b], kind="stable"))
            start += b
        cands.append(np.concatenate(perm))
    errs = []
    for p in cands:
        e = 0.0
        for w in ws:
            w = w.astype(np.float64)
            y = _int_fq(x[:, p], bits, g, -1) @ _int_fq(w[p], bits, g, 0)
            e += np.sum((x @ w - y) ** 2)
        errs.append(e)
    return cands, np.array(errs)


def _site(seed, k=128, n=96):
    rng = np.random.default_rng(seed)
    scale = np.exp(1.5 * rng.standard_normal(k))           # heavy-tailed per-channel activation scales
    x = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    wscale = np.exp(0.7 * rng.standard_normal(k))[:, None]  # and per-input-channel weight scales
    ws = [(rng.standard_normal((k, m)) * 0.05 * wscale).astype(np.float32) for m in (48, 80)]
    return x, ws


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [4, 3])
def test_matches_brute_force_float64(seed, bits):
    x, ws = _site(seed)
    res = search_site(x, ws, fmt=f"int{bits}", group_size=32, alpha_grid=ALPHAS)
    cands, errs = _brute_force(x, ws, bits, 32, ALPHAS)
    np.testing.assert_allclose(res.errors, errs, rtol=2e-3)
    best = int(np.argmin(errs))
    if abs(errs[best] - np.sort(errs)[1]) / errs[best] > 1e-2:  # a clear winner must be found
        np.testing.assert_array_equal(res.perm, cands[best] if best else np.arange(len(cands[0])))
        assert res.accepted == (best != 0)
    assert res.e_orig == pytest.approx(errs[0], rel=2e-3)


@pytest.mark.parametrize("fmt", ["nvfp4", "int4", "int3"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_acceptance_never_worsens(fmt, hadamard):
    x, ws = _site(7)
    res = search_site(x, ws, fmt=fmt, hadamard=hadamard)
    assert res.e_orig == pytest.approx(res.errors[0])
    if res.accepted:
        assert res.e_best < res.e_orig and res.alpha is not None
        assert sorted(res.perm) == list(range(x.shape[1]))
    else:
        np.testing.assert_array_equal(res.perm, np.arange(x.shape[1]))
    assert min(res.errors) == pytest.approx(res.e_best)


def _outlier_site(seed, k=128, n=96):
    """A few massive channels, one per group, in an otherwise quiet activation: grouping them together pays."""
    rng = np.random.default_rng(seed)
    scale = np.ones(k)
    scale[rng.choice(k // 16, 4, replace=False) * 16 + rng.integers(0, 16, 4)] = 40.0
    x = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    return x, [(rng.standard_normal((k, m)) * 0.05).astype(np.float32) for m in (48, 80)]


def test_tau_above_gain_returns_identity():
    x, ws = _outlier_site(3)
    res = search_site(x, ws, fmt="int4")
    assert res.accepted and res.gain > 0
    strict = search_site(x, ws, fmt="int4", tau=res.gain + 1e-3)
    assert not strict.accepted
    np.testing.assert_array_equal(strict.perm, np.arange(x.shape[1]))
    assert strict.e_best == pytest.approx(res.e_best)  # still reported


def test_block_constraints_respected():
    x, ws = _site(4)
    blocks = (32, 32, 64)
    res = search_site(x, ws, fmt="int4", group_size=32, blocks=blocks)
    start = 0
    for b in blocks:
        assert sorted(res.perm[start:start + b]) == list(range(start, start + b))
        start += b
    cands, errs = _brute_force(x, ws, 4, 32, ALPHAS, blocks=blocks)
    np.testing.assert_allclose(res.errors, errs, rtol=2e-3)


def test_per_kernel_activations():
    """P2-style site: two consumers read different activations but share the permutation."""
    x1, ws = _site(5)
    x2, _ = _site(6)
    res = search_site([x1, x2], ws, fmt="int4", group_size=32)
    _, e1 = _brute_force(x1, ws[:1], 4, 32, ())
    _, e2 = _brute_force(x2, ws[1:], 4, 32, ())
    assert res.e_orig == pytest.approx(e1[0] + e2[0], rel=2e-3)


def test_block_hadamard_is_orthogonal_against_numpy():
    h = hadamard_matrix(16).astype(np.float64) / 4  # normalized: H_16 / sqrt(16)
    np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-12)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64))
    ref = np.concatenate([x[:, i:i + 16] @ h for i in range(0, 64, 16)], axis=1)
    np.testing.assert_allclose(np.asarray(block_hadamard(x.astype(np.float32), 16)), ref, atol=1e-5)
    w = rng.standard_normal((64, 8))
    # rotating activations and weights by the same block Hadamard leaves the product unchanged
    prod = np.asarray(block_hadamard(x.astype(np.float32), 16)) @ np.asarray(block_hadamard(w.astype(np.float32), 16, axis=0))
    np.testing.assert_allclose(prod, x @ w, atol=1e-4)


def test_bad_inputs():
    x, ws = _site(0)
    with pytest.raises(ValueError, match="unknown format"):
        search_site(x, ws, fmt="fp8")
    with pytest.raises(ValueError, match="not a multiple"):
        search_site(x[:, :120], [w[:120] for w in ws], fmt="int4")
    with pytest.raises(ValueError, match="expected \\[n, K=128\\]"):
        search_site(x[:, :64], ws, fmt="int4")
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        search_site(bad, ws, fmt="int4")


@pytest.mark.parametrize("fmt", ["int4", "int3", "nvfp4"])
def test_vectorized_errors_equal_eager_per_candidate(fmt):
    """Regression: the jitted, vmapped error of every candidate equals an eager evaluation of that candidate
    (int8 sign extension fused into a dot once miscompiled on XLA CPU and gave errors of 1e11)."""
    import jax.numpy as jnp
    from pqjax.permute import candidate_permutations, site_error, weight_second_moment
    rng = np.random.default_rng(11)
    k = 256
    x = (rng.standard_normal((64, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
    ws = [(rng.standard_normal((k, 48)) * 0.05).astype(np.float32)]
    res = search_site(x, ws, fmt=fmt)
    perms = candidate_permutations(np.mean(x.astype(np.float64) ** 2, 0), weight_second_moment(ws), ALPHAS)
    eager = [float(site_error(p, [x], ws, fmt=fmt, group_size=None if fmt == "nvfp4" else 64)) for p in perms]
    np.testing.assert_allclose(res.errors, eager, rtol=1e-4)


def test_column_chunking_is_exact():
    x, ws = _site(8)
    a = search_site(x, ws, fmt="nvfp4")
    b = search_site(x, ws, fmt="nvfp4", chunk_cols=16)
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-5)
    np.testing.assert_array_equal(a.perm, b.perm)
