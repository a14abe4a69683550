"""pqjax.quantize end to end on a tiny FLUX with realistic (heavy-tailed) channel statistics."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax import QuantConfig, calib
from pqjax import sites as S
from pqjax.formats import QTensor
from pqjax.models import flux, synthetic
from pqjax.models.flux import FluxConfig
from pqjax.pipeline import sample

CFG = FluxConfig.tiny()


def _calib_batch(seed=1, n=4):
    r = np.random.default_rng(seed)
    return pqjax.CalibBatch(encoder_hidden_states=jnp.asarray(r.standard_normal((n, 8, 64)), jnp.float32),
                            pooled_projections=jnp.asarray(r.standard_normal((n, 64)), jnp.float32),
                            height=64, width=64, num_inference_steps=3)


@pytest.fixture(scope="module")
def params():
    return synthetic.outlier_params(CFG, seed=0)


@pytest.fixture(scope="module")
def pq_nvfp4(params):
    return pqjax.quantize(params, _calib_batch(), config=QuantConfig(format="nvfp4", method="permuquant"),
                          model_config=CFG, progress=False)


def test_report_and_packing(params, pq_nvfp4):
    q, rep = pq_nvfp4
    # every site with a quantized consumer is reported; acceptance never worsens a site's calibration error
    assert len(rep.sites) == len(S.flux_sites(CFG))
    for r in rep.sites:
        assert r.e_orig > 0
        if r.accepted:
            assert r.e_best < r.e_orig and r.alpha is not None and r.site in rep.perms
        else:
            assert r.site not in rep.perms
    assert any(r.accepted for r in rep.sites)
    assert "E_orig" in rep.table() and "permutations accepted" in rep.summary()
    # default rules: modulation weight-only, embedders/norm_out/proj_out 16-bit, the rest W4A4
    assert rep.modes["transformer_blocks.0.norm1.linear"] == "w4a16"
    assert rep.modes["single_transformer_blocks.1.norm.linear"] == "w4a16"
    assert rep.modes["x_embedder"] == rep.modes["proj_out"] == rep.modes["norm_out.linear"] == "keep"
    assert rep.modes["single_transformer_blocks.0.proj_out"] == "w4a4"
    lin = S.get_path(q, "transformer_blocks.1.attn.to_q")
    assert isinstance(lin["kernel"], QTensor) and lin["kernel"].fmt == "nvfp4" and "act_quant" in lin
    mod = S.get_path(q, "transformer_blocks.1.norm1.linear")
    assert isinstance(mod["kernel"], QTensor) and "act_quant" not in mod
    assert not isinstance(S.get_path(q, "x_embedder")["kernel"], QTensor)
    # NVFP4 static activation scale = calibrated amax / (6 * 448)
    st = calib.calibrate(CFG, params, _calib_batch(), taps=("transformer_blocks.1.attn.to_q",), num_rows=8)
    amax = float(np.max(np.asarray(st["transformer_blocks.1.attn.to_q"].amax)))
    assert float(lin["act_quant"].global_scale) == pytest.approx(amax / 2688, rel=1e-6)
    # the consumers of one site share one activation quantization (the model quantizes their input once)
    for path in ("transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_v"):
        assert float(S.get_path(q, path)["act_quant"].global_scale) == float(lin["act_quant"].global_scale)
    single = [S.get_path(q, f"single_transformer_blocks.0.{c}")["act_quant"].global_scale
              for c in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert len({float(g) for g in single}) == 1
    # packed storage is smaller than the float weights
    assert pqjax.formats.nbytes(q) < 0.45 * pqjax.formats.nbytes(params)


def test_permuted_model_matches_report(params, pq_nvfp4):
    """Each accepted site's search error is reproduced by the packed linears of the quantized model."""
    q, rep = pq_nvfp4
    from pqjax.models.layers import dense
    from pqjax.permute import quantized_product
    site = next(s for s in S.flux_sites(CFG) if s.name in rep.perms and not s.producers)
    perm = jnp.asarray(rep.perms[site.name])
    st = calib.calibrate(CFG, params, _calib_batch(seed=9), taps=site.taps, num_rows=32)
    x = st[site.inputs[0]].rows
    # a consumer may also produce another accepted site's activation (to_v -> P2): its output columns moved too
    out_perm = {path: rep.perms[s.name][start:start + size] - start for s in S.flux_sites(CFG) if s.name in rep.perms
                for path, start, size in s.producers}
    for path in site.consumers:
        lq, lf = S.get_path(q, path), S.get_path(params, path)
        got = dense(lq, x[:, perm]) - lq["bias"]
        want = quantized_product(x[:, perm], lf["kernel"][perm], fmt="nvfp4", group_size=None,
                                 act_global_scale=lq["act_quant"].global_scale)
        if path in out_perm:
            want = want[:, out_perm[path]]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))


def test_kernels_in_the_loop_match_reference(pq_nvfp4):
    """The quantized sampler through the Pallas kernels (interpret mode) equals the XLA reference path."""
    import pallas_kernels
    q, _ = pq_nvfp4
    r = np.random.default_rng(3)
    lat = jnp.asarray(r.standard_normal((1, 16, 64)), jnp.float32)
    kw = dict(latents=lat, encoder_hidden_states=jnp.asarray(r.standard_normal((1, 8, 64)), jnp.float32),
              pooled_projections=jnp.asarray(r.standard_normal((1, 64)), jnp.float32), num_inference_steps=2,
              height=64, width=64)
    with pallas_kernels.use_impl("xla"):
        ref = np.asarray(sample(CFG, q, **kw))
    with pallas_kernels.use_impl("interpret"):
        got = np.asarray(sample(CFG, q, **kw))
    assert np.isfinite(ref).all()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "hadamard", "permuquant-h"])
def test_methods_run_and_stay_close(params, method):
    """Every method gives a finite quantized model whose outputs track the float model (int4)."""
    q, rep = pqjax.quantize(params, _calib_batch(), config=QuantConfig(format="int4", method=method),
                            model_config=CFG, progress=False)
    if method in ("rtn", "smoothquant", "hadamard"):
        assert not rep.perms
    r = np.random.default_rng(5)
    kw = dict(hidden_states=jnp.asarray(r.standard_normal((2, 16, 64)), jnp.float32),
              encoder_hidden_states=jnp.asarray(r.standard_normal((2, 8, 64)), jnp.float32),
              pooled_projections=jnp.asarray(r.standard_normal((2, 64)), jnp.float32),
              timestep=jnp.full((2,), 0.5), img_ids=jnp.zeros((16, 3)), txt_ids=jnp.zeros((8, 3)),
              guidance=jnp.full((2,), 3.5))
    f = jax.jit(lambda p: flux.forward(CFG, p, **kw))
    ref, out = np.asarray(f(params)), np.asarray(f(q))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert np.isfinite(out).all() and rel < 0.6, rel
    if method in ("hadamard", "permuquant-h"):
        assert S.get_path(q, "transformer_blocks.0.attn.to_q")["act_quant"].hadamard


def test_rules_indivisible_and_unused(params):
    rules = ((r"transformer_blocks\.0\.ff\.net\.2", "w4a4", "error"), (r"no_such_module", "keep")) + pqjax.DEFAULT_RULES
    cfg = QuantConfig(format="int4", group_size=128, method="rtn", rules=rules)
    # ff.net.2 has K = 512 (divisible by 128): fine; the unused rule is reported
    _, rep = pqjax.quantize(params, _calib_batch(), config=cfg, model_config=CFG, progress=False)
    assert [r.pattern for r in rep.unused_rules] == ["no_such_module"]
    assert "no_such_module" in rep.summary()
    # a K not divisible by the group: skipped and reported by default, an error where the rule says so
    c2 = FluxConfig.tiny(joint_attention_dim=48)
    p2 = synthetic.outlier_params(c2, seed=1)
    cb = _calib_batch()
    cb.encoder_hidden_states = cb.encoder_hidden_states[..., :48]
    rules2 = ((r"context_embedder", "w4a4"),) + pqjax.DEFAULT_RULES
    _, rep2 = pqjax.quantize(p2, cb, config=QuantConfig(format="int4", method="rtn", rules=rules2),
                             model_config=c2, progress=False)
    assert "context_embedder" in rep2.skipped and rep2.modes["context_embedder"] == "keep"
    with pytest.raises(ValueError, match="context_embedder: K=48 is not a multiple"):
        pqjax.quantize(p2, cb, config=QuantConfig(format="int4", method="rtn",
                                                  rules=((r"context_embedder", "w4a4", "error"),)),
                       model_config=c2, progress=False)


def test_bad_inputs(params):
    with pytest.raises(ValueError, match="unknown method"):
        QuantConfig(method="gptq")
    with pytest.raises(ValueError, match="unknown format"):
        QuantConfig(format="fp8")
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantConfig(format="int4", group_size=48)
    bad = _calib_batch()
    bad.encoder_hidden_states = bad.encoder_hidden_states[..., :32]
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B, N_txt, 64\]"):
        pqjax.quantize(params, bad, config=QuantConfig(method="rtn"), model_config=CFG, progress=False)
    with pytest.raises(ValueError, match="unknown keys"):
        pqjax.quantize(params, {"prompt_embeds": 1}, config=QuantConfig(method="rtn"), model_config=CFG,
                       progress=False)
    # non-finite activations: an Inf bias in block 1's FFN shows up first at the input of its ff.net.2
    broken = S.set_path(params, "transformer_blocks.1.ff.net.0.proj.bias",
                        S.get_path(params, "transformer_blocks.1.ff.net.0.proj.bias").at[3].set(jnp.inf))
    with pytest.raises(ValueError, match=r"non-finite activations .* transformer_blocks\.1\.ff\.net\.2"):
        pqjax.quantize(broken, _calib_batch(), config=QuantConfig(method="rtn"), model_config=CFG, progress=False)


_SHARDED = textwrap.dedent("""
    import os, sys, numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    jax.config.update("jax_default_matmul_precision", "highest")
    from pqjax import calib
    from pqjax.models import synthetic
    from pqjax.models.flux import FluxConfig
    c = FluxConfig.tiny()
    p = synthetic.outlier_params(c)
    r = np.random.default_rng(0)
    b = dict(encoder_hidden_states=r.standard_normal((4, 8, 64)).astype(np.float32),
             pooled_projections=r.standard_normal((4, 64)).astype(np.float32), height=64, width=64,
             num_inference_steps=2)
    taps = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out", "transformer_blocks.0.norm1.linear")
    one = calib.calibrate(c, p, b, taps=taps, num_rows=64)
    assert len(jax.devices()) == 4
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sh = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data")))
    lat = jax.random.normal(jax.random.key(0), (4, 16, 64))
    b1 = dict(b, latents=lat)
    one = calib.calibrate(c, p, b1, taps=taps, num_rows=64)
    b4 = dict(b1, encoder_hidden_states=sh(b["encoder_hidden_states"]), pooled_projections=sh(b["pooled_projections"]),
              latents=sh(lat))
    four = calib.calibrate(c, p, b4, taps=taps, num_rows=64)
    for t in taps:
        for f in ("sumsq", "amax", "count", "rows"):
            a, bb = np.asarray(getattr(one[t], f)), np.asarray(getattr(four[t], f))
            np.testing.assert_allclose(a, bb, rtol=1e-4, atol=1e-4, err_msg=f"{t}.{f}")
    print("SHARDED_OK")
""")


def test_calibration_data_parallel_matches_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
