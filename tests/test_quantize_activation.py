"""pallas_kernels.quantize_activation: the one-pass activation quantizer (Pallas interpret mode vs XLA).

Codes and scales must be BIT-identical to ``pqjax.formats.quantize`` applied to the gathered / smoothed /
rotated input, which this file builds independently (numpy gather and smoothing); the rotation itself is
checked against a float64 ``H @ x``.  Inputs are fresh random numbers (seed in failures; PQJAX_TEST_SEED).
"""
from __future__ import annotations

import os
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _numerics as nm
from pallas_kernels import gpu_check, reference
from pqjax.formats import e2m1_encode, quantize

SEED = int(os.environ.get("PQJAX_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))


def _rng(*salt):
    return np.random.default_rng([SEED, *[zlib.crc32(str(s).encode()) for s in salt]])


def _qa(impl, x, fmt, **kw):
    """quantize_activation under jit with ``impl`` forced (array arguments traced)."""
    dyn = {k: v for k, v in kw.items() if k in ("global_scale", "perm", "smooth") and v is not None}
    static = {k: v for k, v in kw.items() if k not in dyn}
    return jax.jit(lambda x, d: pk.quantize_activation(x, fmt, impl=impl, **d, **static))(x, dyn)


def _bits(q):
    s = q.scales
    s = np.asarray(jax.lax.bitcast_convert_type(s, jnp.uint8) if s.dtype == jnp.float8_e4m3fn else
                   jax.lax.bitcast_convert_type(s, jnp.uint16 if s.dtype.itemsize == 2 else jnp.uint32))
    return np.asarray(q.codes).reshape(-1, q.codes.shape[-1]), s.reshape(-1, s.shape[-1])


def _assert_same(a, b, what):
    ca, sa = _bits(a)
    cb, sb = _bits(b)
    assert ca.shape == cb.shape and sa.shape == sb.shape, what
    assert (sa == sb).all(), f"{what}: {int((sa != sb).sum())} scales differ (seed {SEED})"
    assert (ca == cb).all(), f"{what}: {int((ca != cb).sum())} code bytes differ (seed {SEED})"


def _activation(rng, shape, dtype):
    """Heavy-tailed channels, a zero block, a zero row, a NaN and an Inf (each poisons only its block)."""
    m, k = shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1]
    x = rng.standard_normal((m, k)) * np.exp(rng.standard_normal((1, k)))
    x[1, :40] = 0.0
    x[2, :] = 0.0
    x[3, 5] = np.nan
    x[4, k - 3] = -np.inf
    return jnp.asarray(x.reshape(shape), dtype)


def _independent(x, fmt, *, gs, perm, smooth, hadamard, group, sdt):
    """formats.quantize on the transformed x built outside pallas_kernels (rotation: reference.hadamard_rotate)."""
    x2 = np.asarray(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
    if perm is not None:
        x2 = x2[:, np.asarray(perm)]
    if smooth is not None:  # float32 product, rounded to x's dtype (what the model did before quantizing)
        x2 = x2 * np.asarray(smooth, np.float32)
    xt = jnp.asarray(x2).astype(x.dtype)
    if hadamard:
        xt = reference.hadamard_rotate(xt, 16 if fmt == "nvfp4" else group)
    q = jax.jit(lambda a, g: quantize(a, fmt, axis=-1, global_scale=g, group_size=None if fmt == "nvfp4" else group,
                                      scale_dtype=None if fmt == "nvfp4" else sdt))(xt, gs)
    return q


CASES = [  # (fmt, group, scale dtype, x dtype, shape, perm, smooth, hadamard)
    ("nvfp4", None, None, jnp.bfloat16, (37, 512), False, False, False),
    ("nvfp4", None, None, jnp.bfloat16, (2, 19, 256), True, True, False),
    ("nvfp4", None, None, jnp.float32, (40, 256), True, True, True),
    ("nvfp4", None, None, jnp.bfloat16, (33, 256), False, False, True),
    ("int4", 32, "bfloat16", jnp.bfloat16, (37, 256), True, False, True),
    ("int4", 64, "float16", jnp.float32, (20, 256), False, True, False),
    ("int3", 32, "bfloat16", jnp.bfloat16, (25, 256), True, True, True),
]


def _id(c):
    fmt, g, sdt, dt, shape, perm, sm, had = c
    flags = "".join(f for f, on in (("-perm", perm), ("-smooth", sm), ("-had", had)) if on)
    return f"{fmt}{'' if g is None else f'g{g}'}-{jnp.dtype(dt).name}-{'x'.join(map(str, shape))}{flags}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernel_and_reference_bit_identical_to_formats(case):
    fmt, g, sdt, dt, shape, perm_on, sm_on, had = case
    rng = _rng(_id(case))
    k = shape[-1]
    x = _activation(rng, shape, dt)
    perm = jnp.asarray(rng.permutation(k).astype(np.int32)) if perm_on else None
    smooth = jnp.asarray(np.exp(0.5 * rng.standard_normal(k)), jnp.float32) if sm_on else None
    finite = np.nan_to_num(np.abs(np.asarray(x.astype(jnp.float32))), nan=0, posinf=0, neginf=0)
    gs = jnp.float32(finite.max() * (2.0 if sm_on else 1.0) / 2688) if fmt == "nvfp4" else None
    kw = dict(global_scale=gs, perm=perm, smooth=smooth, hadamard=had, group_size=g, scale_dtype=sdt)
    out_k = _qa("interpret", x, fmt, **kw)
    out_r = _qa("xla", x, fmt, **kw)
    exp = _independent(x, fmt, gs=gs, perm=perm, smooth=smooth, hadamard=had, group=g, sdt=sdt)
    for q in (out_k, out_r):
        assert q.shape == tuple(shape) and q.axis == len(shape) - 1 and q.fmt == fmt
        assert q.dtype == jnp.dtype(dt).name and q.codes.shape[:-1] == tuple(shape[:-1])
    _assert_same(out_r, exp, "reference vs pqjax.formats")
    _assert_same(out_k, exp, "kernel vs pqjax.formats")
    deq = np.asarray(out_k.dequantize(jnp.float32)).reshape(-1, k)
    assert np.isnan(deq[3]).any() and np.isnan(deq[4]).any() and not np.isnan(deq[:3]).any()
    assert (deq[2] == 0).all()  # an all-zero row stays exactly zero


def test_hadamard_rotation_is_the_normalized_sylvester_matrix():
    rng = _rng("had")
    for block in (16, 32, 128):
        x = rng.standard_normal((5, 2 * block)).astype(np.float32)
        y = np.asarray(reference.hadamard_rotate(jnp.asarray(x), block), np.float64)
        h = pk.hadamard_matrix(block).astype(np.float64) / np.sqrt(block)
        exp = (x.astype(np.float64).reshape(5, 2, block) @ h.T).reshape(5, -1)
        # log2(block) f32 adds of exact inputs, then one rounding of the normalization
        bound = np.abs(x.astype(np.float64)).reshape(5, 2, block).sum(-1).repeat(block, -1) / np.sqrt(block)
        assert (np.abs(y - exp) <= (np.log2(block) + 1) * 2.0 ** -24 * bound + 1e-30).all(), block


def test_invalid_traced_global_scale_gives_nan_scales():
    x = jnp.asarray(_rng("bad-gs").standard_normal((16, 64)), jnp.float32)
    for impl in ("interpret", "xla"):
        for g in (0.0, np.nan, -1.0):
            q = _qa(impl, x, "nvfp4", global_scale=jnp.float32(g))
            assert np.isnan(np.asarray(q.scales.astype(jnp.float32))).all(), (impl, g)
            assert np.isnan(np.asarray(q.dequantize(jnp.float32))).all(), (impl, g)


def test_bad_inputs():
    x = jnp.ones((4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"perm must have shape \(64,\).*got \(63,\)"):
        pk.quantize_activation(x, "int4", perm=np.arange(63), group_size=32)
    with pytest.raises(ValueError, match="not a permutation"):
        pk.quantize_activation(x, "int4", perm=np.zeros(64, np.int32), group_size=32)
    for bad in (0.0, float("nan"), -2.0, float("inf")):
        with pytest.raises(ValueError, match="global_scale must be finite and > 0"):
            pk.quantize_activation(x, "nvfp4", global_scale=bad)
    with pytest.raises(ValueError, match="needs the static activation global scale"):
        pk.quantize_activation(x, "nvfp4")
    with pytest.raises(ValueError, match="global_scale applies to nvfp4 only"):
        pk.quantize_activation(x, "int4", global_scale=1.0)
    with pytest.raises(ValueError, match=r"K=48 must be a positive multiple of the int4 group size 32"):
        pk.quantize_activation(jnp.ones((4, 48)), "int4", group_size=32)
    with pytest.raises(ValueError, match="smooth must have shape"):
        pk.quantize_activation(x, "int4", smooth=jnp.ones(32), group_size=32)
    with pytest.raises(ValueError, match="unknown format"):
        pk.quantize_activation(x, "fp8")
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        pk.quantize_activation(jnp.ones((4, 64), jnp.int8), "int4")


# --------------------------------------------------------------------------------------------
# the bit-pattern encoders, exhaustively against ml_dtypes / pqjax.formats
# --------------------------------------------------------------------------------------------
def test_encoders_match_formats():
    rng = _rng("enc")
    mids = np.array([0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1, 1.5, 2, 3, 4], np.float32)
    tiny = np.float32(2.0) ** -np.arange(1, 150, dtype=np.float32)
    y = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, 9), rng.uniform(0, 6, 100000), tiny])
    y = np.clip(np.concatenate([y, -y, [-0.0]]), -6, 6).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(nm.e2m1_code)(y)), np.asarray(e2m1_encode(y)).astype(np.int32))
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    ok = np.isfinite(grid) & (grid >= 0) & ~np.signbit(grid)
    np.testing.assert_array_equal(np.asarray(jax.jit(nm.e4m3_code)(grid[ok])), np.arange(256)[ok])
    assert int(jax.jit(nm.e4m3_code)(np.float32(np.nan))) == 0x7F
    z = np.concatenate([np.arange(-8, 8.25, 0.25), rng.uniform(-8, 8, 20000),
                        np.nextafter(np.arange(-8, 8.5, 0.5), 0)]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(nm.rint_small)(z)), np.round(z).astype(np.int32))


# --------------------------------------------------------------------------------------------
# the GPU path compiles (no GPU needed)
# --------------------------------------------------------------------------------------------
QA_GPU = [  # (fmt, group, perm, smooth, hadamard, M, K)
    ("nvfp4", None, False, False, False, 4608, 3072),
    ("nvfp4", None, True, True, True, 77, 512),
    ("int4", 32, True, False, True, 77, 512),
    ("int3", 32, False, True, False, 40, 256),
]


def _lower_qa(c):
    fmt, g, perm, sm, had, m, k = c
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.float32),
            jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.float32))

    def f(x, gs, p, s):
        with pk.use_impl("triton"):
            q = pk.quantize_activation(x, fmt, global_scale=gs if fmt == "nvfp4" else None, perm=p if perm else None,
                                       smooth=s if sm else None, hadamard=had, group_size=g)
        return q.codes, q.scales

    return gpu_check.lower_for_cuda(f, *args)


@pytest.mark.parametrize("config", QA_GPU, ids=lambda c: f"{c[0]}-{'perm' if c[2] else ''}-{c[5]}x{c[6]}")
def test_quantize_lowers_and_compiles(config):
    (mod,) = gpu_check.triton_modules(_lower_qa(config))
    assert "div.rn.f32" in mod.ttir and "f8E4M3" not in mod.ttir
    if config[5] == 4608 or not gpu_check.have_triton():
        return
    for cc in (90, 80):
        kern = gpu_check.compile_ttir(mod, cc)
        assert kern.asm["cubin"] and "div.full.f32" not in kern.asm["ptx"], cc
