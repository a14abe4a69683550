"""Quantized-linear kernels: Pallas (interpret mode) vs XLA reference vs an IEEE float64 model.

One shared test body runs every implementation (tokamax style).  Three numbers per case:

* ``kernel`` (Pallas, interpret mode, under ``jax.jit``: quantize_activation + the packed GEMM) against
  ``reference`` (XLA): the activation codes are bit-identical (both are pqjax.formats' arithmetic,
  divisions as IEEE reciprocals), so they must agree to fp32 accumulation order, no code may differ.
* both against ``ieee``: a numpy model of the pqjax.formats.nvfp4 formulas in IEEE float32 (true divisions,
  ml_dtypes casts) with a float64 product of the dequantized operands.  ``x * (1/s)`` may break an
  exact rounding tie the other way than ``x / s`` (about 1 in 2000 nvfp4 codes for bf16 inputs);
  allowed: a few activation codes one step off per output, nothing else.

Inputs are fresh random numbers each run (seed printed in failures; ``PQJAX_TEST_SEED`` pins it).
"""
from __future__ import annotations

import logging
import os
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _numerics as nm
from pallas_kernels import gpu_check, reference, triton_kernels
from pqjax.formats import fake_quant, quantize

SEED = int(os.environ.get("PQJAX_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
FP32_TOL = 1e-5  # |diff| / (|x| @ |w|): fp32 accumulation (observed ~4e-8)
TIE_FLIPS = 3  # rounding-tie allowance: this many activation codes one step off, per output


def _rng(*salt):
    return np.random.default_rng([SEED, *[zlib.crc32(str(s).encode()) for s in salt]])


# --------------------------------------------------------------------------------------------
# IEEE model
# --------------------------------------------------------------------------------------------
def ieee_act(x, w, *, gx=None, hadamard=False):
    """Activation dequantized like pqjax.formats.nvfp4, numpy IEEE float32, returned as float64 (incl. gx)."""
    x = np.asarray(jnp.asarray(x).astype(jnp.float32))
    m, k = x.shape
    if hadamard:  # the rotated values XLA computes (f32 sums of exact products)
        x = np.asarray(reference.hadamard_rotate(jnp.asarray(x), 16 if w.fmt == "nvfp4" else w.group_size))
    with np.errstate(all="ignore"):
        if w.fmt == "nvfp4":
            gx = np.float32(gx)
            xs = (x / gx).reshape(m, k // 16, 16)
            s = np.clip(np.abs(xs).max(-1, keepdims=True) / np.float32(6), 0, 448)
            s = s.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            q = np.where(s > 0, np.clip(xs / s, -6, 6), 0).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
            bad = ~np.isfinite(x.reshape(m, k // 16, 16)).all(-1, keepdims=True)
            return np.where(bad, np.nan, q * s).reshape(m, k).astype(np.float64) * np.float64(gx)
        g = w.group_size
        qmax = 7 if w.fmt == "int4" else 3
        sdt = w.scales.dtype
        xg = x.reshape(m, k // g, g)
        s = np.clip(np.abs(xg).max(-1, keepdims=True) / np.float32(qmax), 0, float(ml_dtypes.finfo(sdt).max))
        s = s.astype(sdt).astype(np.float32)
        q = np.where(s > 0, np.clip(np.round(xg / s), -qmax, qmax), 0)
        bad = ~np.isfinite(xg).all(-1, keepdims=True)
        return np.where(bad, np.nan, q * s).reshape(m, k).astype(np.float64)


def weight64(w):
    return np.asarray(w.dequantize(jnp.float32), np.float64)  # [K, N]


def compare(out, exp, bound, *, flip=None, what: str):
    """``|out - exp| <= FP32_TOL * bound`` everywhere (``bound = |x| @ |w|``), same NaNs.

    ``flip`` (tie allowance): additionally allow ``TIE_FLIPS * flip`` where ``flip[m, n] =
    max|x[m]| * max|w[:, n]|`` bounds what one activation code stepping to its neighbour can do.
    """
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64).reshape(exp.shape)
    assert (np.isnan(out) == np.isnan(exp)).all(), f"{what}: NaN pattern differs (seed {SEED})"
    ok = np.isnan(exp)
    err = np.where(ok, 0.0, np.abs(out - exp))
    tol = FP32_TOL * bound + (0.0 if flip is None else TIE_FLIPS * flip)
    bad = ~ok & (err > tol)
    rows = np.nonzero(bad.any(axis=1))[0]
    with np.errstate(all="ignore"):
        worst = np.nanmax(np.where(ok, 0.0, err / (bound + 1e-30)))
    assert not bad.any(), f"{what}: rows {rows[:8]} off, max rel {worst:.3g} (seed {SEED})"


def flip_bound(xa, wd):
    return np.nan_to_num(np.abs(xa)).max(axis=1)[:, None] * np.abs(wd).max(axis=0)[None, :]


# --------------------------------------------------------------------------------------------
# implementations under test: one body, every implementation
# --------------------------------------------------------------------------------------------
def run(impl, op, x, w, **kw):
    """Call the dispatcher with ``impl`` forced, always under jit (args traced, statics closed)."""
    dyn = {k: v for k, v in kw.items() if k in ("bias", "act_global_scale") and v is not None}
    static = {k: v for k, v in kw.items() if k not in dyn}
    fn = pk.w4a4_matmul if op == "w4a4" else pk.w4a16_matmul

    @jax.jit
    def f(x, w, dyn):
        return fn(x, w, impl=impl, **dyn, **static)

    return f(x, w, dyn)


CASES = [  # (fmt, group, x dtype, hadamard, M, K, N)
    ("nvfp4", None, jnp.bfloat16, False, 77, 256, 128),
    ("nvfp4", None, jnp.float32, False, 64, 384, 64),
    ("nvfp4", None, jnp.bfloat16, True, 77, 128, 192),
    ("nvfp4", None, jnp.float32, True, 130, 256, 64),
    ("int4", 64, jnp.bfloat16, False, 77, 256, 128),
    ("int4", 64, jnp.float32, True, 64, 192, 64),
    ("int4", 128, jnp.bfloat16, False, 96, 384, 64),
    ("int4", 128, jnp.bfloat16, True, 77, 256, 128),
    ("int3", 64, jnp.bfloat16, False, 77, 256, 64),
    ("int3", 64, jnp.float32, True, 64, 128, 128),
    ("int3", 32, jnp.bfloat16, False, 50, 128, 64),
]


def _case_id(c):
    fmt, g, dt, had, m, k, n = c
    return f"{fmt}{'' if g is None else f'g{g}'}-{jnp.dtype(dt).name}-{'had' if had else 'plain'}-{m}x{k}x{n}"


def _make(fmt, g, dt, m, k, n, *, salt):
    rng = _rng(salt)
    # heavy-tailed channels (like diffusion activations) + a zero block and a zero row
    x = rng.standard_normal((m, k)) * np.exp(rng.standard_normal((1, k)))
    if m > 2:
        x[1, :32] = 0.0
        x[2, :] = 0.0
    x = jnp.asarray(x, dt)
    w_f = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)
    w = quantize(w_f, fmt, axis=0, group_size=g)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    gx = jnp.float32(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / (6 * 448))
    return x, w, bias, gx


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_w4a4_kernel_vs_reference_vs_ieee(case):
    fmt, g, dt, had, m, k, n = case
    x, w, bias, gx = _make(fmt, g, dt, m, k, n, salt=_case_id(case))
    kw = dict(bias=bias, act_global_scale=gx if fmt == "nvfp4" else None, hadamard=had, out_dtype=jnp.float32)
    out_k = run("interpret", "w4a4", x, w, **kw)
    out_r = run("xla", "w4a4", x, w, **kw)
    assert out_k.shape == out_r.shape == (m, n) and out_k.dtype == jnp.float32

    xa = ieee_act(x, w, gx=gx, hadamard=had)
    wd = weight64(w)
    exp = xa @ wd + np.asarray(bias, np.float64)
    bound = np.abs(xa) @ np.abs(wd) + np.abs(np.asarray(bias, np.float64))
    flip = flip_bound(xa, wd)
    compare(out_k, exp, bound, flip=flip, what="kernel vs IEEE model")
    compare(out_r, exp, bound, flip=flip, what="XLA reference vs IEEE model")
    compare(out_k, np.asarray(out_r, np.float64), bound, what="kernel vs XLA reference")  # same codes
    # exact zero rows stay exact (bias only)
    np.testing.assert_array_equal(np.asarray(out_k)[2], np.asarray(bias))


@pytest.mark.parametrize("blocks", [dict(block_k=128, block_m=32, block_n=32, num_warps=2),
                                    dict(block_k=32, block_m=128, block_n=64, split_k=2)])
def test_block_overrides(blocks):
    x, w, bias, gx = _make("nvfp4", None, jnp.bfloat16, 40, 256, 128, salt=f"blocks{blocks}")
    f = jax.jit(lambda x, w, g, b: triton_kernels.w4a4_matmul(
        x, w, act_global_scale=g, bias=b, out_dtype=jnp.float32, interpret=True, blocks=blocks))
    ref = run("xla", "w4a4", x, w, act_global_scale=gx, bias=bias, out_dtype=jnp.float32)
    xa, wd = ieee_act(x, w, gx=gx), weight64(w)
    compare(f(x, w, gx, bias), np.asarray(ref, np.float64), np.abs(xa) @ np.abs(wd) + np.abs(np.asarray(bias)),
            what=f"blocks {blocks}")


@pytest.mark.parametrize("fmt,g", [("nvfp4", 16), ("int4", 64)])
def test_hadamard_convention(fmt, g):
    """x rotated in the kernel + W rotated offline with the same matrix == x @ W (up to quantization)."""
    rng = _rng("hconv", fmt)
    k, n = 256, 64
    x = jnp.asarray(rng.standard_normal((32, k)), jnp.float32)
    wf = rng.standard_normal((k, n)).astype(np.float32)
    hn = np.kron(np.eye(k // g, dtype=np.float32), pk.hadamard_matrix(g)) / np.sqrt(g)
    w_rot = quantize(jnp.asarray(hn @ wf), fmt, axis=0, group_size=None if fmt == "nvfp4" else g)
    gx = jnp.float32(float(jnp.max(jnp.abs(x @ hn))) / (6 * 448))
    exact = np.asarray(x, np.float64) @ wf
    for impl in ("interpret", "xla"):
        y = run(impl, "w4a4", x, w_rot, act_global_scale=gx if fmt == "nvfp4" else None, hadamard=True)
        err = np.linalg.norm(np.asarray(y, np.float64) - exact) / np.linalg.norm(exact)
        assert err < 0.25, (impl, err)
    y_wrong = run("xla", "w4a4", x, w_rot, act_global_scale=gx if fmt == "nvfp4" else None, hadamard=False)
    assert np.linalg.norm(np.asarray(y_wrong, np.float64) - exact) / np.linalg.norm(exact) > 0.8


def test_reference_is_fake_quant():
    """The reference's activation/weight numerics are pqjax.formats' fake_quant, bit for bit."""
    x, w, bias, gx = _make("nvfp4", None, jnp.bfloat16, 64, 256, 64, salt="fq")
    wd = weight64(w)
    for fmt, g in (("nvfp4", None), ("int4", 64), ("int3", 128)):
        w = quantize(jnp.asarray(wd, jnp.float32), fmt, axis=0, group_size=g)
        kw = {"global_scale": gx} if fmt == "nvfp4" else {"group_size": g}
        xq = np.asarray(jax.jit(lambda x: fake_quant(x.astype(jnp.float32), fmt, **kw))(x), np.float64)
        exp = xq @ weight64(w)
        out = run("xla", "w4a4", x, w, act_global_scale=gx if fmt == "nvfp4" else None, out_dtype=jnp.float32)
        compare(out, exp, np.abs(xq) @ np.abs(weight64(w)), what=f"reference vs fake_quant {fmt}")


W4A16_CASES = [  # (fmt, group, x dtype, M, K, N)
    ("nvfp4", None, jnp.bfloat16, 77, 256, 128),
    ("nvfp4", None, jnp.float32, 2, 128, 64),
    ("int4", 64, jnp.bfloat16, 1, 256, 128),
    ("int4", 128, jnp.float16, 77, 256, 64),
    ("int3", 64, jnp.bfloat16, 40, 128, 64),
    ("int3", 32, jnp.float32, 64, 128, 64),
]


@pytest.mark.parametrize("case", W4A16_CASES, ids=lambda c: _case_id(c[:3] + (False,) + c[3:]))
def test_w4a16_kernel_vs_reference_vs_ieee(case):
    fmt, g, dt, m, k, n = case
    x, w, bias, _ = _make(fmt, g, dt, m, k, n, salt=str(case))
    out_k = run("interpret", "w4a16", x, w, bias=bias, out_dtype=jnp.float32)
    out_r = run("xla", "w4a16", x, w, bias=bias, out_dtype=jnp.float32)
    xa = np.asarray(x.astype(jnp.float32), np.float64)
    wd = weight64(w)
    exp = xa @ wd + np.asarray(bias, np.float64)
    bound = np.abs(xa) @ np.abs(wd) + np.abs(np.asarray(bias, np.float64))
    compare(out_k, exp, bound, what="w4a16 kernel vs float64")
    compare(out_r, exp, bound, what="w4a16 reference vs float64")


@pytest.mark.parametrize("impl", ["interpret", "xla"])
def test_leading_dims_default_dtype_no_bias(impl):
    x, w, _, gx = _make("int4", 64, jnp.bfloat16, 64, 128, 64, salt="lead")
    x3 = x.reshape(2, 32, 128)
    y = run(impl, "w4a4", x3, w)
    assert y.shape == (2, 32, 64) and y.dtype == jnp.bfloat16
    y2 = run(impl, "w4a4", x, w, out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y.reshape(64, 64), np.float32), np.asarray(y2, np.float32))
    z = run(impl, "w4a16", x3, w)
    assert z.shape == (2, 32, 64) and z.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", ["interpret", "xla"])
@pytest.mark.parametrize("fmt", ["nvfp4", "int4"])
def test_nonfinite_activation_rows_are_nan(impl, fmt):
    x, w, _, gx = _make(fmt, 64 if fmt == "int4" else None, jnp.float32, 64, 128, 64, salt="nan")
    x = x.at[5, 3].set(jnp.nan).at[9, 70].set(jnp.inf)
    y = np.asarray(run(impl, "w4a4", x, w, act_global_scale=gx if fmt == "nvfp4" else None))
    assert np.isnan(y[5]).all() and np.isnan(y[9]).all()
    assert np.isfinite(np.delete(y, [5, 9], axis=0)).all()


# --------------------------------------------------------------------------------------------
# in-kernel arithmetic, exhaustively against ml_dtypes / pqjax.formats
# --------------------------------------------------------------------------------------------
def test_numerics_helpers():
    b = np.arange(256, dtype=np.int32)
    grid = b.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid) & (grid >= 0)])
    rng = _rng("helpers")
    v = np.concatenate([grid, (grid[1:] + grid[:-1]) / 2, np.nextafter((grid[1:] + grid[:-1]) / 2, 0),
                        rng.uniform(0, 448, 20000), np.exp(rng.uniform(-12, np.log(448), 20000))])
    v = np.clip(v, 0, 448).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(nm.round_e4m3)(v)),
                                  v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    planes = [jnp.arange(12).reshape(3, 4) * 10 + j for j in range(8)]
    np.testing.assert_array_equal(np.asarray(nm.interleave8(planes)), np.stack(planes, -1).reshape(3, 32))
    a, d = np.float32([-280.0, 3.0, 1.0]), np.float32([56.0, 7.0, 3.0])  # a tie and inexact quotients
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, d: nm.div(nm.div(a, d), 1.0))(a, d)), a / d)


# --------------------------------------------------------------------------------------------
# errors and dispatch
# --------------------------------------------------------------------------------------------
def _w(fmt="int4", k=128, n=64, g=64):
    return quantize(jnp.ones((k, n), jnp.float32), fmt, axis=0, group_size=None if fmt == "nvfp4" else g)


@pytest.mark.parametrize("impl", ["interpret", "xla"])
def test_bad_inputs(impl):
    w = _w()
    x = jnp.ones((4, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not match"):
        run(impl, "w4a4", jnp.ones((4, 96), jnp.bfloat16), w)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        run(impl, "w4a16", jnp.ones((4, 128), jnp.int8), w)
    with pytest.raises(TypeError, match="QTensor"):
        run(impl, "w4a4", x, jnp.ones((128, 64)))
    with pytest.raises(ValueError, match="bias"):
        run(impl, "w4a4", x, w, bias=jnp.ones(63))
    with pytest.raises(ValueError, match="act_global_scale"):
        run(impl, "w4a4", x, _w("nvfp4"))
    with pytest.raises(ValueError, match="axis=0"):
        run(impl, "w4a4", x, quantize(jnp.ones((64, 128)), "int4", axis=1))
    with pytest.raises(ValueError, match="multiple of group_size"):  # K not divisible by the group
        quantize(jnp.ones((100, 64)), "int4", axis=0, group_size=64)
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        pk.w4a4_matmul(x, w, impl="cuda")


def test_dispatch_auto_and_use_impl():
    assert pk.resolve_impl() == "xla"  # CPU host
    w = _w()
    x = jnp.ones((16, 128), jnp.bfloat16)

    def prims(impl_ctx):
        with pk.use_impl(impl_ctx):
            return str(jax.make_jaxpr(lambda x: pk.w4a4_matmul(x, w))(x))

    assert "pallas_call" in prims("interpret") and "pallas_call" not in prims("xla")
    assert "pallas_call" not in prims(None)
    # use_impl is part of the jit cache key: the same jitted function retraces under another impl
    f = jax.jit(lambda x: pk.w4a4_matmul(x, w))
    with pk.use_impl("xla"):
        a = f(x)
    with pk.use_impl("interpret"):
        assert "pallas_call" in str(f.trace(x).jaxpr)
        b = f(x)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)
    with pk.use_impl("interpret"):  # explicit impl= wins over the context
        assert "pallas_call" not in str(jax.make_jaxpr(lambda x: pk.w4a4_matmul(x, w, impl="xla"))(x))


def test_not_implemented_falls_back_once(caplog):
    w = quantize(_rng("ni").standard_normal((128, 24)).astype(np.float32), "int4", axis=0)  # N=24
    x = jnp.asarray(_rng("nix").standard_normal((8, 128)), jnp.float32)
    with pytest.raises(NotImplementedError, match="N=24"):
        triton_kernels.w4a4_matmul(x, w, interpret=True)
    pk._logged.clear()
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels"):
        with pk.use_impl("interpret"):
            y1 = jax.jit(lambda x: pk.w4a4_matmul(x, w))(x)
            y2 = jax.jit(lambda x: pk.w4a4_matmul(x, w) * 1.0)(x)
    ref = jax.jit(lambda x: reference.w4a4_matmul(x, w))(x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(ref))
    msgs = [r for r in caplog.records if "N=24" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].levelno == logging.DEBUG


# --------------------------------------------------------------------------------------------
# the GPU path compiles (no GPU needed)
# --------------------------------------------------------------------------------------------
# Every kernel configuration the model uses: W4A4 per format (hadamard on/off), W4A16 per format
# (modulation linears: M = batch), bf16 activations, bias, M not a multiple of the block.
GPU_CONFIGS = [  # (op, fmt, group, hadamard, M, K, N, bias)
    ("w4a4", "nvfp4", None, False, 4608, 3072, 3072, True),
    ("w4a4", "nvfp4", None, True, 77, 512, 256, True),
    ("w4a4", "int4", 64, False, 512, 3072, 256, True),
    ("w4a4", "int4", 64, True, 77, 512, 256, False),
    ("w4a4", "int4", 128, False, 256, 512, 256, True),
    ("w4a4", "int4", 128, True, 256, 512, 256, True),
    ("w4a4", "int3", 64, False, 256, 512, 256, True),
    ("w4a4", "int3", 64, True, 256, 512, 256, True),
    ("w4a4", "int3", 32, False, 256, 512, 256, True),
    ("w4a16", "nvfp4", None, False, 2, 3072, 18432, True),
    ("w4a16", "int4", 64, False, 2, 512, 256, True),
    ("w4a16", "int4", 128, False, 300, 512, 256, True),
    ("w4a16", "int3", 64, False, 2, 512, 256, True),
]


def _gpu_id(c):
    op, fmt, g, had, m, k, n, b = c
    return f"{op}-{fmt}{'' if g is None else f'g{g}'}{'-had' if had else ''}-{m}x{k}x{n}"


def _lower_config(c):
    op, fmt, g, had, m, k, n, has_bias = c
    w = jax.eval_shape(lambda: quantize(jnp.zeros((k, n), jnp.float32), fmt, axis=0, group_size=g))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((n,), jnp.float32) if has_bias else None
    gx = jax.ShapeDtypeStruct((), jnp.float32)

    def f(x, w, b, gx):
        with pk.use_impl("triton"):
            if op == "w4a4":
                return pk.w4a4_matmul(x, w, bias=b, act_global_scale=gx if fmt == "nvfp4" else None, hadamard=had)
            return pk.w4a16_matmul(x, w, bias=b)

    return gpu_check.lower_for_cuda(f, x, w, b, gx)


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=_gpu_id)
def test_lowers_to_triton_for_cuda(config):
    lowered = _lower_config(config)
    mods = gpu_check.triton_modules(lowered)
    # the kernels (not the XLA fallback) must be in the CUDA computation: W4A4 on a float x is the
    # activation-quantize pass + the packed GEMM
    assert len(mods) == (2 if config[0] == "w4a4" else 1), [m.name for m in mods]
    gemm = gpu_check._gemm_module(mods)
    assert "tt.dot" in gemm.ttir and "tt.func" in gemm.ttir
    if config[0] == "w4a4":
        (quant,) = [m for m in mods if m is not gemm]
        assert "div.rn.f32" in quant.ttir  # IEEE reciprocals of the scales
    for mod in mods:
        assert "f8E4M3" not in mod.ttir and "f4E2M1" not in mod.ttir  # decoded by hand: sm_80 safe


# Compiling Triton IR to cubin needs the `triton` pip package (optional, CPU is enough); one
# config per distinct kernel body, for Hopper and Ampere.
_CUBIN = [GPU_CONFIGS[i] for i in (1, 3, 7, 8, 9, 11, 12)]


@pytest.mark.parametrize("config", _CUBIN, ids=_gpu_id)
def test_triton_ir_compiles_to_cubin(config):
    if not gpu_check.have_triton():
        pytest.skip("the `triton` package is not installed (pip install triton)")
    mod = gpu_check._gemm_module(gpu_check.triton_modules(_lower_config(config)))
    for cc in (90, 80):
        kern = gpu_check.compile_ttir(mod, cc)
        assert kern.asm["cubin"] and ".entry" in kern.asm["ptx"], cc
        assert "div.full.f32" not in kern.asm["ptx"]


def test_bench_without_gpu_says_so(capsys):
    from pallas_kernels import bench

    assert bench.main([]) == 0
    assert "no NVIDIA GPU" in capsys.readouterr().out
