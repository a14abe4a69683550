"""pqjax.quantize_site: deployment output through layers.dense vs an independent float64 fake-quant computation,
auto never above the best single method on calibration data, W4A16, given Hessians, and bad inputs."""
import ml_dtypes
import numpy as np
import pytest

import pqjax
from cli_helpers import fresh_seed
from pqjax.models.layers import dense
from pqjax.site_quant import SiteQuantConfig, site_output_error

U32 = 2.0 ** -24
K = 128


def site(rng, n=256, widths=(32, 48)):
    """Every 4th channel 20x louder, its weight rows 20x quieter (equal output contributions: interleaved groups
    cost a lot, so a permutation wins by a wide margin), correlated channels (so GPTQ matters), biases."""
    scale = np.where(np.arange(K) % 4 == 0, 20.0, 1.0) * np.exp(0.3 * rng.standard_normal(K))
    x = (rng.standard_normal((n, K)) @ (np.eye(K) + 0.1 * rng.standard_normal((K, K)))) * scale
    ws = [rng.standard_normal((K, m)) * 0.05 / scale[:, None] * np.exp(0.3 * rng.standard_normal((K, 1)))
          for m in widths]
    bs = [rng.standard_normal(m) * 0.1 for m in widths]
    return x.astype(np.float32), [w.astype(np.float32) for w in ws], [b.astype(np.float32) for b in bs]


def sylvester(g):
    h = np.ones((1, 1))
    while h.shape[0] < g:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(g)


def act_fake_quant_f64(xt, fmt, g, gx):
    """float64 reference of the deployment's activation quantizer on f32 input xt [n, K]."""
    xb = xt.astype(np.float64).reshape(xt.shape[0], -1, g)
    if fmt == "nvfp4":
        xs = xb / gx
        s = np.clip(np.abs(xs).max(-1, keepdims=True) / 6, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        q = np.clip(xs / np.where(s > 0, s, 1), -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
        return (q * s * gx).reshape(xt.shape)
    qmax = 7 if fmt == "int4" else 3
    s = (np.abs(xb).max(-1, keepdims=True) / qmax).astype(ml_dtypes.bfloat16).astype(np.float64)
    q = np.clip(np.round(xb / np.where(s > 0, s, 1)), -qmax, qmax)
    return (q * s).reshape(xt.shape)


@pytest.mark.parametrize("fmt", ["nvfp4", "int4", "int3"])
@pytest.mark.parametrize("method", ["permuquant", "permuquant-h"])
def test_linears_are_the_deployment_output(fmt, method):
    rng = np.random.default_rng(fresh_seed())
    x, ws, bs = site(rng)
    g = 16 if fmt == "nvfp4" else 32
    cfg = SiteQuantConfig(format=fmt, group_size=None if fmt == "nvfp4" else g, method=method, gptq=True)
    sq = pqjax.quantize_site(x, ws, config=cfg, biases=bs, name="toy")
    rot = method == "permuquant-h"
    assert rot or sq.perm is not None  # interleaved loud channels: the plain permutation is accepted
    perm = np.arange(K) if sq.perm is None else sq.perm
    assert sorted(perm.tolist()) == list(range(K))
    xt = x[:, perm].astype(np.float64)
    if rot:
        xt = (xt.reshape(-1, K // g, g) @ sylvester(g)).reshape(xt.shape)
    total = 0.0
    for w, b, lin in zip(ws, bs, sq.linears):
        act, qt = lin["act_quant"], lin["kernel"]
        assert act.hadamard == rot and qt.fmt == fmt and qt.shape == w.shape
        wq = np.asarray(qt.dequantize(), np.float64)
        xq = act_fake_quant_f64(xt.astype(np.float32), fmt, g, float(act.global_scale))
        y_ref = xq @ wq + b
        y = np.asarray(dense(lin, np.asarray(x[:, perm])), np.float64)
        # fp32 accumulation over K (products exact) + the output rounding; with a rotation the activation is
        # rotated in f32 by the kernel and in f64 here, so a code can differ where the f64 value sits within
        # ~2 u of a rounding boundary: allow such (rare) rows
        bound = K * U32 * (np.abs(xq) @ np.abs(wq)) + 2 * U32 * np.abs(y_ref)
        bad_rows = np.any(np.abs(y - y_ref) > bound, axis=1)
        assert bad_rows.mean() <= (0.02 if rot else 0.0), f"{bad_rows.sum()} rows off"
        # the weight is the (rotated, permuted) kernel up to its quantization error (GPTQ's error exceeds plain
        # rounding's, INT3 RTN's is ~0.3 relative); a wrong order or rotation would be ~sqrt(2) (uncorrelated)
        wt = w[perm].astype(np.float64)
        if rot:
            wt = (sylvester(g) @ wt.reshape(K // g, g, -1)).reshape(wt.shape)
        assert np.linalg.norm(wq - wt) < 0.9 * np.linalg.norm(wt)
        total += np.sum((y - (x.astype(np.float64) @ w + b)) ** 2)
    e = site_output_error(sq, x, ws, bs)
    assert abs(e - total) <= 1e-4 * total and sq.report.e_chosen == e


@pytest.mark.parametrize("fmt", ["nvfp4", "int4"])
def test_auto_never_above_best_single_method(fmt):
    rng = np.random.default_rng(fresh_seed())
    x, ws, bs = site(rng)
    auto = pqjax.quantize_site(x, ws, config=SiteQuantConfig(format=fmt, method="auto"), biases=bs, name="a")
    opt = dict(four_over_six=True) if fmt == "nvfp4" else dict(clip_search=True)
    singles = {}
    for m in ("rtn", "permuquant", "hadamard", "permuquant-h"):
        for on in (False, True):
            cfg = SiteQuantConfig(format=fmt, method=m, **(dict(gptq=True, **opt) if on else {}))
            singles[(m, on)] = pqjax.quantize_site(x, ws, config=cfg, biases=bs, name="a").report.e_chosen
    assert auto.report.e_chosen <= min(singles.values())
    assert auto.report.e_chosen <= auto.report.e_rtn == singles[("rtn", False)]
    assert auto.report.gain > 0.2  # on this site the stacked options really help
    assert site_output_error(auto, x, ws, bs) == auto.report.e_chosen
    assert auto.report.chosen in auto.report.errors and len(auto.report.errors) >= 6
    assert "auto" in str(auto.report) and auto.report.site == "a"


def test_weight_only_and_given_hessians():
    rng = np.random.default_rng(fresh_seed())
    x, ws, _ = site(rng)
    cfg = SiteQuantConfig(format="int4", method="auto", act_quant=False)
    sq = pqjax.quantize_site(x, ws, config=cfg, name="mod")
    assert all("act_quant" not in lin and "bias" not in lin for lin in sq.linears)
    assert not any("hadamard" in lab for lab in sq.report.errors)  # no online rotation on the W4A16 path
    xp = x if sq.perm is None else x[:, sq.perm]
    for lin in sq.linears:
        y = np.asarray(dense(lin, xp), np.float64)
        y_ref = xp.astype(np.float64) @ np.asarray(lin["kernel"].dequantize(), np.float64)
        assert np.all(np.abs(y - y_ref) <= K * U32 * (np.abs(xp) @ np.abs(np.asarray(lin["kernel"].dequantize()))))
    # a Hessian accumulated elsewhere (e.g. over the whole calibration pass) gives the same result as the rows'
    from pqjax.gptq import hessian
    cfg = SiteQuantConfig(format="nvfp4", method="permuquant", gptq=True)
    a = pqjax.quantize_site(x, ws, config=cfg, name="h")
    b = pqjax.quantize_site(x, ws, config=cfg, hessian=hessian(x), name="h")
    np.testing.assert_array_equal(np.asarray(a.linears[0]["kernel"].codes), np.asarray(b.linears[0]["kernel"].codes))
    # per-kernel activations under one shared permutation (FLUX's P2)
    x2 = x * np.float32(1.5)
    c = pqjax.quantize_site([x, x2], ws, config=SiteQuantConfig(format="int3", method="auto"), name="p2")
    assert c.report.e_chosen == site_output_error(c, [x, x2], ws) <= c.report.e_rtn


def test_bad_inputs_name_the_site():
    rng = np.random.default_rng(fresh_seed())
    x, ws, bs = site(rng, n=64)
    cfg = SiteQuantConfig(format="int4", method="rtn", gptq=True)
    xn = x.copy()
    xn[3, 7] = np.nan
    with pytest.raises(ValueError, match=r"site blocks\.3\.P1.*non-finite values in the activation rows"):
        pqjax.quantize_site(xn, ws, config=cfg, name="blocks.3.P1")
    wn = [ws[0].copy(), ws[1]]
    wn[0][5, 1] = np.inf
    with pytest.raises(ValueError, match=r"site s\.1.*kernel 0 has non-finite weights"):
        pqjax.quantize_site(x, wn, config=cfg, name="s.1")
    h = x.T.astype(np.float64) @ x
    h[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"site s\.2.*Hessian.*non-finite"):
        pqjax.quantize_site(x, ws, config=cfg, hessian=h, name="s.2")
    with pytest.raises(ValueError, match=r"site s\.3.*K=96 is not a multiple of the int4 group size 64"):
        pqjax.quantize_site(x[:, :96], [w[:96] for w in ws], config=SiteQuantConfig(format="int4"), name="s.3")
    with pytest.raises(ValueError, match=r"site s\.4.*bias 1 has shape \(3,\), expected \(48,\)"):
        pqjax.quantize_site(x, ws, config=cfg, biases=[bs[0], bs[1][:3]], name="s.4")
    with pytest.raises(ValueError, match=r"site s\.5.*kernel 1 has shape \(64, 48\)"):
        pqjax.quantize_site(x, [ws[0], ws[1][:64]], config=cfg, name="s.5")
    with pytest.raises(ValueError, match="needs act_quant=True"):
        SiteQuantConfig(format="int4", method="hadamard", act_quant=False)
    with pytest.raises(ValueError, match="four_over_six applies to nvfp4 only"):
        SiteQuantConfig(format="int4", four_over_six=True)
    with pytest.raises(ValueError, match="unknown site method"):
        SiteQuantConfig(method="smoothquant")
