"""The quantized FLUX forward quantizes each site's activation ONCE and hands the packed operand to its linears.

A tiny FLUX with random permutations absorbed at the P1/P3 sites (so the gather is fused into the activation
pass) and every default-W4A4 linear packed by hand (shared ActQuant per site, as pqjax.stages.pack builds it):

* through the Pallas kernels (interpret mode) the forward equals the XLA reference path (same activation codes;
  fp32 accumulation order only) and tracks the float permuted model;
* the jaxpr holds exactly one activation-quantize pass per W4A4 site (4 consumers of a single block's input
  share one), with the gather fused into it at the permuted sites.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pqjax import formats
from pqjax import sites as S
from pqjax.config import DEFAULT_RULES, resolve_rules
from pqjax.models import flux, synthetic
from pqjax.models.flux import FluxConfig
from pqjax.formats import ActQuant

CFG = FluxConfig.tiny()
SEED = int(os.environ.get("PQJAX_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))


def _inputs(seed, b=1, n_img=16, n_txt=8):
    r = np.random.default_rng(seed)
    return dict(hidden_states=jnp.asarray(r.standard_normal((b, n_img, 64)), jnp.float32),
                encoder_hidden_states=jnp.asarray(r.standard_normal((b, n_txt, 64)), jnp.float32),
                pooled_projections=jnp.asarray(r.standard_normal((b, 64)), jnp.float32),
                timestep=jnp.full((b,), 0.6), img_ids=jnp.asarray(r.integers(0, 4, (n_img, 3)), jnp.float32),
                txt_ids=jnp.zeros((n_txt, 3)), guidance=jnp.full((b,), 3.5))


def _quantize_by_hand(params, fmt, *, hadamard=False):
    """Absorb random permutations at every P1/P3 site, then pack the default-rule W4A4 linears with one ActQuant
    per site input (global scale from the float model's activation amax on a calibration input)."""
    rng = np.random.default_rng([SEED, 7])
    table = S.flux_sites(CFG)
    for site in table:
        if site.norm is not None:
            params = S.absorb(params, site, S.random_permutation(site, rng))
    taps = {}
    flux.forward(CFG, params, **_inputs(SEED + 1, b=2), tap=lambda name, x: taps.setdefault(name, x))
    rule_of, _ = resolve_rules(S.linear_paths(params), DEFAULT_RULES)
    tap_of = {c: inp for s in table for c, inp in zip(s.consumers, s.inputs)}
    acts, q = {}, params
    for path, rule in rule_of.items():
        if rule.action == "keep":
            continue
        lin = dict(S.get_path(q, path))
        w = jnp.asarray(lin["kernel"], jnp.float32)
        if rule.action == "w4a4" and hadamard:
            w = formats.block_hadamard(w, 16 if fmt == "nvfp4" else 64, axis=0)
        lin["kernel"] = formats.quantize(w, fmt, axis=0, group_size=None if fmt == "nvfp4" else 64)
        if rule.action == "w4a4":
            tap = tap_of.get(path, path)
            if tap not in acts:
                x = jnp.asarray(taps[tap], jnp.float32)
                if hadamard:
                    x = pk.reference.hadamard_rotate(x, 16 if fmt == "nvfp4" else 64)
                acts[tap] = ActQuant(global_scale=jnp.float32(float(jnp.max(jnp.abs(x))) * 1.5 / 2688),
                                     hadamard=hadamard)
            lin["act_quant"] = acts[tap]
        q = S.set_path(q, path, lin)
    return params, q


@pytest.fixture(scope="module")
def models():
    return _quantize_by_hand(synthetic.outlier_params(CFG, seed=0), "nvfp4")


def _names(impl, q, inputs):
    with pk.use_impl(impl):
        jaxpr = str(jax.make_jaxpr(lambda p: flux.forward(CFG, p, **inputs))(q))
    return re.findall(r"name=(\w+)", jaxpr), jaxpr


def test_one_activation_pass_per_site(models):
    _, q = models
    names, jaxpr = _names("interpret", q, _inputs(0))
    quant = [n for n in names if n.startswith("quantize_act")]
    gemm = [n for n in names if n.startswith("w4a4_")]
    # per double block: P1 img/txt, P3 img/txt, P4 img/txt, to_out, to_add_out; per single block: P1 (4 linears), OUT
    assert len(quant) == CFG.num_layers * 8 + CFG.num_single_layers * 2, quant
    assert len(gemm) == CFG.num_layers * 12 + CFG.num_single_layers * 5, gemm
    assert sum("_perm" in n for n in quant) == CFG.num_layers * 4 + CFG.num_single_layers  # P1/P3: fused gather
    with pk.use_impl("xla"):
        ref = str(jax.make_jaxpr(lambda p: flux.forward(CFG, p, **_inputs(0)))(q))
    assert "pallas_call" not in ref


def test_quantized_forward_kernels_equal_reference(models):
    params, q = models
    inputs = _inputs(SEED)
    f = jax.jit(lambda p: flux.forward(CFG, p, **inputs))
    with pk.use_impl("interpret"):
        got = np.asarray(jax.jit(lambda p: flux.forward(CFG, p, **inputs))(q), np.float64)
    with pk.use_impl("xla"):
        ref = np.asarray(jax.jit(lambda p: flux.forward(CFG, p, **inputs))(q), np.float64)
    flt = np.asarray(f(params), np.float64)
    assert np.isfinite(ref).all() and got.shape == ref.shape == flt.shape
    # same activation codes on both paths: only fp32 accumulation order differs (amplified through 4 blocks)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()
    assert np.linalg.norm(ref - flt) / np.linalg.norm(flt) < 0.5  # and it is the quantized permuted float model


def test_shared_input_is_quantized_once_not_per_consumer(models):
    """A W4A4 site quantized once equals each consumer quantizing for itself (the shared ActQuant is the same)."""
    _, q = models
    blk = q["single_transformer_blocks"]["0"]
    x = jnp.asarray(np.random.default_rng(SEED).standard_normal((1, 24, CFG.inner_dim)), jnp.float32)
    perm = blk["norm"]["perm"]
    from pqjax.models.layers import dense, dense_site

    cons = [blk["proj_mlp"], blk["attn"]["to_q"], blk["attn"]["to_k"], blk["attn"]["to_v"]]
    for impl in ("interpret", "xla"):
        with pk.use_impl(impl):
            shared = jax.jit(lambda x: dense_site(cons, x, ["a"] * 4, None, perm))(x)
            each = jax.jit(lambda x: [dense(c, jnp.take(x, perm, axis=-1)) for c in cons])(x)
        for a, b in zip(shared, each):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
