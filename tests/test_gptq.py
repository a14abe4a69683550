"""pqjax.gptq against an independent float64 numpy GPTQ, RTN equivalence on a diagonal Hessian, and bad inputs.

The tie argument: pqjax runs GPTQ in float32 (lazy blocks), the reference column by column in float64. Given
the same U (pqjax's, promoted to float64), the two compute the same updated weights up to float32 rounding. The
reference tracks a first-order bound on that difference for every weight: each update term ``e_i * U[i, j]``
reaches ``w_j`` through at most ``block + K / block + 2`` roundings (a rank-1 update or a block product of
``block`` terms, then the running subtractions), each <= u = 2^-24 times the running magnitudes, and the error
in ``e_i`` propagates through ``U[i, j]``. A decision (a block/group scale, a 4-vs-6 or clip-ratio choice, a
code) may then differ only where its float64 quantity lies within twice that bound of a rounding boundary.
The reference is teacher-forced (it continues with pqjax's decision), so one justified tie does not cascade;
every mismatch must be justified, and justified ones must be rare (~1e-5 of the codes for continuous data).
"""
import ml_dtypes
import numpy as np
import pytest

from cli_helpers import fresh_seed
from pqjax import formats as F
from pqjax import gptq

U32 = 2.0 ** -24
E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def e2m1(t):
    return np.clip(t, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)


def e4m3(v):
    return np.clip(v, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def bf16(v):
    return np.asarray(v, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


def decode_e2m1(codes):
    return (np.asarray(codes, np.uint8) & 0xF).view(ml_dtypes.float4_e2m1fn).astype(np.float64)


def flips(cast, v, dv):
    """Rounding ``v`` with ``cast`` can change within +-2 dv."""
    return cast(np.maximum(v - 2 * dv, 0)) != cast(v + 2 * dv)


class Reference:
    """float64 GPTQ of rows ``w [N, K]`` with upper factor ``u``, teacher-forced by pqjax's codes and scales."""

    def __init__(self, fmt, g, block, gscale=None, four_over_six=False, clip_grid=None):
        self.fmt, self.g, self.block, self.gscale = fmt, g, block, gscale
        self.four_over_six, self.clip_grid = four_over_six, clip_grid
        self.qmax = 2 ** (F.FORMAT_BITS[fmt] - 1) - 1
        self.scale_mismatches = self.code_mismatches = self.decisions = 0

    # --- decisions: (float64 result, may flip under the float32 evaluation?) per row
    def int_scale(self, wg, dw):
        grid = self.clip_grid or (1.0,)
        cands, near = [], np.zeros(wg.shape[0], bool)
        amax, damax = np.abs(wg).max(1), dw.max(1)
        for r in grid:
            v = amax * r / self.qmax
            s = bf16(v)
            near |= flips(bf16, v, damax * r / self.qmax + 3 * U32 * v)
            t = wg / np.where(s > 0, s, 1)[:, None]
            q = np.clip(np.round(t), -self.qmax, self.qmax) * (s > 0)[:, None]
            r_ = q * s[:, None] - wg
            err = np.sum(r_ ** 2, 1)
            dt = dw / np.where(s > 0, s, 1)[:, None] + 2 * U32 * np.abs(t)
            derr = np.sum(2 * np.abs(r_) * dw + 4 * s[:, None] ** 2 * dt, 1) + (self.g + 3) * U32 * err
            cands.append((s, err, derr))
        errs = np.stack([c[1] for c in cands])
        derrs = np.stack([c[2] for c in cands])
        best = np.argmin(errs, 0)
        rows = np.arange(wg.shape[0])
        gap = errs - errs[best, rows] - 2 * (derrs + derrs[best, rows])
        gap[best, rows] = np.inf
        near |= np.min(gap, 0) <= 0
        return np.stack([c[0] for c in cands])[best, rows], near

    def nvfp4_scale(self, wg, dw):
        gs = self.gscale[:, None]
        xs = wg / gs
        dxs = dw / gs + 2 * U32 * np.abs(xs)
        bamax, dbamax = np.abs(xs).max(1), dxs.max(1)
        cands, near = [], np.zeros(wg.shape[0], bool)
        for m in (6.0, 4.0) if self.four_over_six else (6.0,):
            v = bamax / m
            s = e4m3(v)
            near |= flips(e4m3, v, dbamax / m + 2 * U32 * v)
            t = xs / np.where(s > 0, s, 1)[:, None]
            q = e2m1(t) * (s > 0)[:, None]
            r_ = q * s[:, None] - xs
            err = np.sum(r_ ** 2, 1)
            dt = dxs / np.where(s > 0, s, 1)[:, None] + 2 * U32 * np.abs(t)
            derr = np.sum(2 * np.abs(r_) * dxs + 8 * s[:, None] ** 2 * dt, 1) + 6 * U32 * err
            cands.append((s, err, derr))
        if not self.four_over_six:
            return cands[0][0], near
        (s6, e6, d6), (s4, e4, d4) = cands
        near |= np.abs(e4 - e6) <= 2 * (d4 + d6)
        return np.where(e4 < e6, s4, s6), near

    def code(self, wj, dw, s):
        """(value of the float64 code, code may flip, scaled value factor) for one column under scales s."""
        safe = np.where(s > 0, s, 1)
        if self.fmt == "nvfp4":
            xs = wj / self.gscale
            t = xs / safe
            dt = (dw / self.gscale + 2 * U32 * np.abs(xs)) / safe + 2 * U32 * np.abs(t)
            near = np.min(np.abs(np.abs(t)[:, None] - E2M1_BOUNDS), 1) <= 2 * dt
            return e2m1(t) * (s > 0), near & (s > 0)
        t = wj / safe
        dt = dw / safe + 2 * U32 * np.abs(t)
        frac = np.abs(np.abs(t) - np.floor(np.abs(t)) - 0.5)
        near = (frac <= 2 * dt) & (np.abs(t) < self.qmax + 0.5)
        return np.clip(np.round(t), -self.qmax, self.qmax) * (s > 0), near & (s > 0)

    def run(self, w, u, codes, scales):
        """Returns the float64 dequantized weight implied by the (forced) decisions; asserts every mismatch is a tie.

        Pass 1 runs float64 GPTQ with pqjax's decisions, recording every decision's inputs and the magnitudes of
        the rounding terms. Pass 2 bounds the float32 error of those inputs: with local rounding errors eps_j in
        the weights (<= gamma * S_j) and eta_j in the fed-back errors e_j, GPTQ's recursion
        ``dw_j = eps_j - sum_{i<j} U_ij de_i``, ``de_j = dw_j / U_jj + eta_j`` gives ``U^T de = eps + diag(U) eta``,
        i.e. ``de = L b`` with ``L = U^-T`` and ``b = eps + diag(U) eta``; each decision's input is a linear
        combination of the sources b, bounded by the absolute values of its coefficients times |b|. Pass 3 checks
        each decision against its bound.
        """
        w = w.astype(np.float64).copy()
        u = u.astype(np.float64)
        n, k = w.shape
        S = np.abs(w)                         # |w0| + sum |e_i U_ij| so far: the rounding-term magnitudes
        gamma = (self.block + k // self.block + 2) * U32
        nv = self.fmt == "nvfp4"
        fq = decode_e2m1(codes) if nv else np.asarray(codes, np.float64)
        fs = np.asarray(scales).astype(np.float64)
        deq, used, s_used, eps, eta = (np.zeros_like(w) for _ in range(5))
        groups = []
        for j in range(k):
            if j % self.g == 0:
                cols = slice(j, j + self.g)
                groups.append((j, w[:, cols].copy(), gamma * S[:, cols]))
            s = fs[:, j // self.g]
            d = fq[:, j] * s * (self.gscale if nv else 1.0)
            used[:, j], s_used[:, j], deq[:, j], eps[:, j] = w[:, j], s, d, gamma * S[:, j]
            r = w[:, j] - d
            e = r / u[j, j]
            eta[:, j] = U32 * (np.abs(d) + np.abs(r)) / u[j, j] + 2 * U32 * np.abs(e)
            row = u[j, j + 1:]
            w[:, j + 1:] -= e[:, None] * row
            S[:, j + 1:] += np.abs(e)[:, None] * np.abs(row)
        low = np.linalg.inv(u).T                # U^-T = L, the Cholesky factor of the damped H
        b = eps + eta * np.diag(u)[None]        # local errors, one source per weight
        # de = L b; a weight read at step j is off by U_jj (de_j - eta_j) (as U^T L = I); worst case over signs
        dw_used = np.diag(u)[None] * (b @ np.abs(low).T + eta)
        for j0, wg, eps_g in groups:
            # weights of the group as read at step j0: sum_{i<j0} U_ik de_i = sum_l (U[:j0, k]^T L[:j0, l]) b_l
            dg = eps_g + b @ np.abs(u[:j0, j0:j0 + self.g].T @ low[:j0]).T
            s_ref, near = (self.nvfp4_scale if nv else self.int_scale)(wg, dg)
            s = fs[:, j0 // self.g]
            bad = (s_ref != s) & ~near
            assert not bad.any(), f"group at channel {j0}: scales {s_ref[bad][:4]} vs pqjax {s[bad][:4]}, no tie"
            self.scale_mismatches += int(np.sum(s_ref != s))
        for j in range(k):
            q_ref, near = self.code(used[:, j], dw_used[:, j], s_used[:, j])
            bad = (q_ref != fq[:, j]) & ~near
            assert not bad.any(), f"channel {j}: codes {q_ref[bad][:4]} vs pqjax {fq[:, j][bad][:4]}, no tie"
            self.code_mismatches += int(np.sum(q_ref != fq[:, j]))
            self.decisions += n
        self.rel_bound = float(np.median(dw_used / np.maximum(np.abs(used), 1e-30)))
        return deq


def correlated_site(rng, k=256, n=384, widths=(16, 32)):
    """Rows with correlated, unevenly scaled channels (where GPTQ matters) and kernels with uneven input rows."""
    mix = np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k) * 4
    x = (rng.standard_normal((n, k)) * np.exp(0.4 * rng.standard_normal(k))) @ mix
    ws = [(rng.standard_normal((k, m)) * np.exp(0.5 * rng.standard_normal((k, 1))) * 0.05) for m in widths]
    return x.astype(np.float32), [w.astype(np.float32) for w in ws]


CASES = [("nvfp4", None, {}), ("nvfp4", None, dict(four_over_six=True)), ("int4", 64, {}),
         ("int4", 32, dict(clip_grid=F.DEFAULT_CLIP_GRID)), ("int3", 64, dict(clip_grid=F.DEFAULT_CLIP_GRID)),
         ("int4", 128, {})]


@pytest.mark.parametrize("fmt,g,opts", CASES)
def test_gptq_matches_float64_reference(fmt, g, opts):
    rng = np.random.default_rng(fresh_seed())
    x, ws = correlated_site(rng)
    h = gptq.hessian(x)
    block = 64
    res = gptq.gptq_quantize(ws, h, fmt=fmt, group_size=g, block_size=block, site="test", **opts)
    u, lam = gptq.inverse_cholesky(h, site="test")  # the same U gptq_quantize used (deterministic)
    assert lam == res.damping
    gg = 16 if fmt == "nvfp4" else g
    for w, qt in zip(ws, res.qtensors):
        assert qt.shape == w.shape and qt.axis == 0 and qt.fmt == fmt
        gs = None
        if fmt == "nvfp4":
            gs = np.float64(np.abs(w).max()) / (1536 if opts.get("four_over_six") else 2688)
            np.testing.assert_allclose(float(qt.global_scale), gs, rtol=2 * U32)
            gs = np.full(w.shape[1], float(qt.global_scale))
        ref = Reference(fmt, gg, max(block, gg), gs, **opts)
        deq = ref.run(w.T, np.asarray(u), np.asarray(qt.codes_unpacked()), qt.scales)
        # the stored QTensor decodes to exactly the weights GPTQ fed back (f32 decode: (q * s) * global)
        np.testing.assert_allclose(np.asarray(qt.dequantize(), np.float64), deq.T, rtol=U32, atol=0)
        assert ref.code_mismatches + ref.scale_mismatches <= max(2, 1e-3 * ref.decisions)
        # GPTQ's purpose, on its own calibration rows: a lower output error than plain rounding
        kw = {"four_over_six": True} if opts.get("four_over_six") else {"clip_grid": opts.get("clip_grid")}
        rtn = np.asarray(F.fake_quant(w, fmt, group_size=g, axis=0, **kw), np.float64)
        x64 = x.astype(np.float64)
        assert np.sum((x64 @ (deq.T - w)) ** 2) < 0.8 * np.sum((x64 @ (rtn - w)) ** 2)


def test_inverse_cholesky_against_float64():
    rng = np.random.default_rng(fresh_seed())
    x, _ = correlated_site(rng, k=128, n=256)
    h = np.asarray(gptq.hessian(x), np.float64)
    u, lam = gptq.inverse_cholesky(h, damp=0.01)
    hd = h + lam * np.eye(128)
    assert abs(lam - 0.01 * np.mean(np.diag(h))) <= 1e-6 * lam
    hinv = np.linalg.inv(hd)
    u = np.asarray(u, np.float64)
    assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)
    # fp32 Cholesky + triangular inverse + Cholesky: forward error <= ~K * cond(H) * u (Higham ch. 10, 14)
    bound = 8 * 128 * np.linalg.cond(hd) * U32
    assert np.linalg.norm(u.T @ u - hinv) / np.linalg.norm(hinv) <= bound


@pytest.mark.parametrize("fmt,opts", [("nvfp4", {}), ("nvfp4", dict(four_over_six=True)), ("int4", {}),
                                      ("int3", dict(clip_grid=F.DEFAULT_CLIP_GRID))])
def test_diagonal_hessian_is_plain_rounding(fmt, opts):
    """With uncorrelated channels there is nothing to compensate: GPTQ must reproduce formats.quantize bit for bit."""
    rng = np.random.default_rng(fresh_seed())
    w = (rng.standard_normal((128, 40)) * np.exp(rng.standard_normal((128, 1)))).astype(np.float32)
    h = np.diag(np.exp(rng.standard_normal(128))).astype(np.float32)
    qt = gptq.gptq_quantize([w], h, fmt=fmt, site="diag", **opts).qtensors[0]
    ref = F.quantize(w, fmt, axis=0, **opts)
    np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(qt.scales).view(np.uint8) if fmt == "nvfp4" else np.asarray(qt.scales),
                                  np.asarray(ref.scales).view(np.uint8) if fmt == "nvfp4" else np.asarray(ref.scales))


def test_singular_and_empty_hessians_are_damped():
    rng = np.random.default_rng(fresh_seed())
    x, ws = correlated_site(rng, k=128, n=24, widths=(32,))  # rank 24 < K = 128
    x[:, :16] = 0  # channels the calibration never saw
    res = gptq.gptq_quantize(ws, gptq.hessian(x), fmt="int4", site="rank-deficient")
    y = np.asarray(res.qtensors[0].dequantize())
    assert np.all(np.isfinite(y)) and res.damping > 0
    assert np.any(y[:16] != 0)  # unseen channels keep (rounded) weights, they are not zeroed
    res = gptq.gptq_quantize(ws, np.zeros((128, 128), np.float32), fmt="nvfp4", site="silent")
    rtn = F.quantize(ws[0], "nvfp4", axis=0)
    np.testing.assert_array_equal(np.asarray(res.qtensors[0].codes), np.asarray(rtn.codes))


def test_bad_inputs_name_the_site():
    rng = np.random.default_rng(fresh_seed())
    x, ws = correlated_site(rng, k=64, n=96, widths=(16,))
    h = np.asarray(gptq.hessian(x))
    bad_h = h.copy()
    bad_h[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"site blocks\.0\.attn.*non-finite"):
        gptq.gptq_quantize(ws, bad_h, fmt="int4", site="blocks.0.attn")
    with pytest.raises(ValueError, match=r"site s1.*kernel 0 has non-finite"):
        gptq.gptq_quantize([np.where(ws[0] > 0.1, np.inf, ws[0])], h, fmt="nvfp4", site="s1")
    with pytest.raises(ValueError, match=r"site s2.*Hessian has shape \(32, 32\)"):
        gptq.gptq_quantize(ws, h[:32, :32], fmt="int4", site="s2")
    with pytest.raises(ValueError, match=r"site s3.*negative diagonal"):
        gptq.gptq_quantize(ws, -h, fmt="int4", site="s3")
    indefinite = np.ones((64, 64), np.float32) * 1e3 - np.eye(64, dtype=np.float32) * 999  # eigenvalue ~ 6e4, -999
    with pytest.raises(ValueError, match=r"site s4.*not positive semi-definite"):
        gptq.gptq_quantize(ws, indefinite, fmt="int4", site="s4")
    with pytest.raises(ValueError, match=r"K=64 is not a multiple of the int4 group size 128"):
        gptq.gptq_quantize(ws, h, fmt="int4", group_size=128, site="s5")
