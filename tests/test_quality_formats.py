"""NVFP4 Four Over Six block scales and INT clip search against float64 numpy references written here.

Rounding ties (why a few blocks are set aside): pqjax evaluates in float32 (``x * (1 / s)``, see
pqjax.formats.nvfp4), the reference in float64 with ml_dtypes' own RNE casts. The two can only disagree
where a float64 decision quantity lies within the float32 evaluation error of a decision boundary: a
rounding midpoint of e2m1 / e4m3 / bf16, or a tie between two candidates' errors. Each quantity below is
a handful of f32 operations away from its exact value (each op contributes <= u = 2^-24 relative), so
blocks whose quantities all lie further than ``TOL = 16u`` (relative) from every boundary must match
exactly; the nearer ones are counted and must be rare (a continuous value falls within 16u of one of
~8 boundaries with probability ~1e-5 per element).
"""
import ml_dtypes
import numpy as np
import pytest

from cli_helpers import fresh_seed
from pqjax import formats as F

U = 2.0 ** -24
TOL = 16 * U
E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def heavy(rng, shape):
    """Gaussian values times a log-normal magnitude per 4 elements: blocks with and without outliers."""
    mag = np.exp(1.5 * rng.standard_normal(shape[:-1] + (shape[-1] // 4, 1)))
    return (rng.standard_normal(shape[:-1] + (shape[-1] // 4, 4)) * mag).reshape(shape).astype(np.float32)


def e2m1(t):
    return np.clip(t, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)


def e4m3(v):
    return np.clip(v, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def near_e2m1_bound(t):
    return np.min(np.abs(np.abs(t)[..., None] - E2M1_BOUNDS), axis=-1) <= TOL * np.abs(t)


def near_grid_midpoint(v, cast):
    """v within TOL (relative) of a rounding midpoint of ``cast`` (e4m3 / bf16): rounding v*(1 +- TOL) differs."""
    return cast(v * (1 - TOL)) != cast(v * (1 + TOL))


# ---------------------------------------------------------------------------------------------- 4/6
def nvfp4_46_reference(x, g):
    """float64 Four Over Six along the last axis -> (codes as values, scales, use4, near_tie per block)."""
    xs = x.astype(np.float64).reshape(*x.shape[:-1], -1, 16) / g
    bamax = np.abs(xs).max(-1, keepdims=True)
    cand, near = [], np.zeros(bamax.shape[:-1], bool)
    for m in (6.0, 4.0):
        s = e4m3(bamax / m)
        t = np.where(s > 0, xs / np.where(s > 0, s, 1), 0)
        q = np.where(s > 0, e2m1(t), 0)
        err = np.sum((q * s - xs) ** 2, -1)
        near |= near_grid_midpoint(bamax[..., 0] / m, e4m3) | np.any(near_e2m1_bound(t) & (s > 0), -1)
        # f32 error of err: d is off by <= 2u|x'| (x' = x * (1/g)), the 16-term sum adds <= 6u relative
        slack = 4 * U * np.sum(np.abs(q * s - xs) * np.abs(xs), -1) + 6 * U * err
        cand.append((q, s[..., 0], err, slack))
    (q6, s6, e6, sl6), (q4, s4, e4, sl4) = cand
    use4 = e4 < e6
    near |= np.abs(e4 - e6) <= 2 * (sl4 + sl6)
    q = np.where(use4[..., None], q4, q6).reshape(x.shape)
    return q, np.where(use4, s4, s6), use4, near


@pytest.mark.parametrize("given_global", [False, True])
def test_four_over_six_matches_float64_reference(given_global):
    rng = np.random.default_rng(fresh_seed())
    x = heavy(rng, (96, 256))
    if given_global:
        g = np.float32(np.abs(x).max() / 2688 * rng.uniform(0.2, 1.5))
        qt = F.quantize(x, "nvfp4", four_over_six=True, global_scale=g)
    else:
        qt = F.quantize(x, "nvfp4", four_over_six=True)
        g = np.float32(np.abs(x).max()) * (np.float32(1) / np.float32(6 * 256))  # the paper's global scale
        assert np.asarray(qt.global_scale) == g
    q_ref, s_ref, use4, near = nvfp4_46_reference(x, np.float64(g))
    codes = np.asarray(qt.codes_unpacked())
    q = np.asarray(F.e2m1_decode(codes), np.float64)
    s = np.asarray(qt.scales).astype(np.float64)
    ok = ~near
    assert near.mean() < 0.02, f"{near.sum()} of {near.size} blocks near a tie"
    np.testing.assert_array_equal(s[ok], s_ref[ok])
    np.testing.assert_array_equal(q.reshape(near.shape + (16,))[ok], q_ref.reshape(near.shape + (16,))[ok])
    assert 0.05 < use4.mean() < 0.95  # both candidates are really used on this data
    if not given_global:
        assert s.max() <= 384  # the 4-candidate never saturates e4m3 under the 6 * 256 global


def test_four_over_six_never_worse_per_block_and_standard_format():
    rng = np.random.default_rng(fresh_seed())
    x = heavy(rng, (64, 128))
    g = np.float32(np.abs(x).max() / 1536)
    std = np.asarray(F.fake_quant(x, "nvfp4", global_scale=g), np.float64)
    f46 = F.quantize(x, "nvfp4", four_over_six=True, global_scale=g)
    assert f46.codes.dtype == np.uint8 and f46.codes.shape == (64, 64) and f46.scales.dtype == ml_dtypes.float8_e4m3fn
    y = np.asarray(f46.dequantize(), np.float64)  # the ordinary NVFP4 decode
    blk = lambda a: np.sum(((a - x) / g).reshape(64, -1, 16) ** 2, -1)
    # per block <= the 6-candidate's error, up to the f32 evaluation of the comparison (a few u relative)
    assert np.all(blk(y) <= blk(std) * (1 + 64 * U) + 1e-30)
    assert blk(y).sum() < blk(std).sum()


def test_four_over_six_zero_and_nonfinite_blocks():
    x = np.zeros((2, 48), np.float32)
    x[0, 16:32] = np.linspace(-1, 1, 16)
    x[1, 32] = np.nan
    y = np.asarray(F.fake_quant(x, "nvfp4", four_over_six=True))
    assert np.all(y[0, :16] == 0) and np.all(np.signbit(y[0, :16]) == 0) and np.all(y[1, :32] == 0)
    assert np.all(np.isnan(y[1, 32:])) and np.all(np.isfinite(y[0]))


def test_four_over_six_off_is_bit_identical_and_option_errors():
    rng = np.random.default_rng(fresh_seed())
    x = heavy(rng, (8, 64))
    a, b = F.quantize(x, "nvfp4"), F.quantize(x, "nvfp4", four_over_six=False)
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    with pytest.raises(ValueError, match="four_over_six applies to nvfp4 only"):
        F.quantize(x, "int4", four_over_six=True)
    with pytest.raises(ValueError, match="clip_grid .* not nvfp4"):
        F.quantize(x, "nvfp4", clip_grid=(1.0, 0.9))
    with pytest.raises(ValueError, match=r"clip ratios must lie in \(0, 1\]"):
        F.quantize(x, "int4", clip_grid=(1.2,))


# ---------------------------------------------------------------------------------------------- clip search
def bf16(v):
    return np.asarray(v, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


def clip_reference(x, bits, g, grid):
    """float64 per-group MSE clip search -> (values q * s, chosen ratio index, near_tie per group)."""
    qmax = 2 ** (bits - 1) - 1
    xg = x.astype(np.float64).reshape(*x.shape[:-1], -1, g)
    amax = np.abs(xg).max(-1)
    vals, errs, slack, near = [], [], [], np.zeros(amax.shape, bool)
    for r in grid:
        v = amax * r / qmax
        s = bf16(v)[..., None]
        t = xg / s
        q = np.clip(np.round(t), -qmax, qmax)
        frac = np.abs(np.abs(t) - np.floor(np.abs(t)) - 0.5)
        near |= near_grid_midpoint(v, bf16) | np.any((frac <= TOL * np.abs(t)) & (np.abs(t) < qmax + 0.5), -1)
        e = np.sum((q * s - xg) ** 2, -1)
        vals.append(q * s)
        errs.append(e)
        slack.append((g + 3) * U * e)  # d and d^2 rounded once each, a g-term f32 sum
    errs, slack = np.stack(errs), np.stack(slack)
    best = np.argmin(errs, 0)
    e_best = np.take_along_axis(errs, best[None], 0)[0]
    others = np.where(np.arange(len(grid))[:, None, None] == best[None], np.inf, errs)
    near |= np.min(others - e_best[None], 0) <= 2 * slack.max(0)
    y = np.take_along_axis(np.stack(vals), best[None, ..., None], 0)[0].reshape(x.shape)
    return y, best, near


@pytest.mark.parametrize("bits,g", [(4, 64), (3, 64), (4, 32)])
def test_clip_search_matches_float64_reference(bits, g):
    rng = np.random.default_rng(fresh_seed())
    x = heavy(rng, (64, 256))
    grid = F.DEFAULT_CLIP_GRID
    codes, scales, idx = F.int_clip_search(x, bits, g, clip_grid=grid)
    y = np.asarray(F.int_group_dequant(codes, scales), np.float64)
    y_ref, best, near = clip_reference(x, bits, g, grid)
    ok = ~near
    assert near.mean() < 0.02, f"{near.sum()} of {near.size} groups near a tie"
    np.testing.assert_array_equal(np.asarray(idx)[ok], best[ok])
    np.testing.assert_array_equal(y.reshape(*near.shape, g)[ok], y_ref.reshape(*near.shape, g)[ok])
    assert len(np.unique(best)) > 1  # the search really moves away from the amax scale
    # ratio 1.0 is in the grid: never worse than plain RTN per group (f32 sums, (g + 3) u relative)
    rtn = np.asarray(F.fake_quant(x, f"int{bits}", group_size=g), np.float64)
    per_group = lambda a: np.sum(((a - x) ** 2).reshape(64, -1, g), -1)
    assert np.all(per_group(y) <= per_group(rtn) * (1 + 2 * (g + 3) * U))
    # the QTensor path stores the same codes, in the standard packed format
    qt = F.quantize(x, f"int{bits}", group_size=g, clip_grid=grid)
    np.testing.assert_array_equal(np.asarray(qt.dequantize(), np.float64), y)
