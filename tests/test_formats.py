"""pqjax.formats against independent references: JAX's own NVFP4 quantizer, XLA's float4/float8
converts, ml_dtypes, and a numpy INT reference written here from the spec."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax._src.cudnn.scaled_matmul_stablehlo import BlockScaleConfig
from jax._src.cudnn.scaled_matmul_stablehlo import quantize as jax_quantize

from pqjax import formats as F
from pqjax.formats import FORMATS, QTensor, fake_quant, nbytes, quantize

HYP = settings(max_examples=25, deadline=None)


def rand(rng, shape, lo=1e-6, hi=1e4, dtype=np.float32):
    """Normal values times a log-uniform magnitude per element (spanning lo..hi)."""
    mag = np.exp(rng.uniform(np.log(lo), np.log(hi), shape))
    return jnp.asarray((rng.standard_normal(shape) * mag).astype(np.float32), dtype)


def bits(a):
    """Raw bit patterns of a jax/numpy array as unsigned ints (f4/f8 -> uint8)."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def jax_nvfp4(x_last, g):
    """JAX's reference quantizer along the last axis -> (e2m1 code bits [...,K], e4m3 scale bits).

    The global scale is a traced argument, as in a real pipeline: closed over as a constant, XLA
    folds ``x / g / s`` differently and JAX's own result shifts at rounding ties."""
    def run(v, gs):
        cfg = BlockScaleConfig(mode="nvfp4", block_size=16, data_type=jnp.float4_e2m1fn,
                               scale_type=jnp.float8_e4m3fn, global_scale=gs, infer_only=True)
        return jax_quantize(v, cfg)

    xq, s = jax.jit(run)(x_last, jnp.asarray(g, jnp.float32))
    assert xq.dtype == jnp.float4_e2m1fn and s.dtype == jnp.float8_e4m3fn
    return bits(xq), bits(s)


def np_pack4(c):
    c = np.asarray(c, np.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


# ---------------------------------------------------------------------------------------------
# NVFP4 vs jax._src.cudnn.scaled_matmul_stablehlo.quantize
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis", [((32, 64), -1), ((128, 96), 0), ((3, 48, 32), 1), ((2, 5, 128), -1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("given_global", [False, True])
def test_nvfp4_bit_exact_vs_jax(shape, axis, dtype, given_global):
    rng = np.random.default_rng(hash((shape, axis, str(dtype), given_global)) % 2**32)
    x = rand(rng, shape, dtype=dtype)
    xl = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    if given_global:
        # some blocks saturate (|x'| beyond 6 * 448), others are ordinary
        g = np.float32(np.abs(xl).max() / 2688 * rng.uniform(0.01, 3.0))
        q = quantize(x, "nvfp4", axis=axis, global_scale=g)
    else:
        g = np.float32(np.abs(xl).max()) * (np.float32(1) / np.float32(6 * 448))
        q = quantize(x, "nvfp4", axis=axis)
        assert abs(float(g) / (float(np.abs(xl).max()) / 2688) - 1) < 2 ** -23
    assert q.global_scale.dtype == jnp.float32 and q.global_scale.shape == ()
    assert bits(q.global_scale) == bits(np.float32(g))
    ax = axis % len(shape)
    rest = tuple(d for i, d in enumerate(shape) if i != ax)
    K = shape[ax]
    assert q.codes.shape == rest + (K // 2,) and q.codes.dtype == jnp.uint8
    assert q.scales.shape == rest + (K // 16,) and q.scales.dtype == jnp.float8_e4m3fn

    jc, js = jax_nvfp4(jnp.moveaxis(x, axis, -1), g)  # JAX gets the input in its own dtype
    np.testing.assert_array_equal(bits(q.scales), js)
    live = np.repeat(js != 0, 16, axis=-1)  # JAX divides by 0 in zero-scale blocks
    oc = np.asarray(q.codes_unpacked())
    np.testing.assert_array_equal(oc[live], jc[live])
    assert (oc[~live] == 0).all()
    # storage layout: two codes per byte, element 0 in the low nibble
    np.testing.assert_array_equal(np.asarray(q.codes), np_pack4(np.where(live, jc, 0)))


def test_nvfp4_dequant_matches_jax_values():
    """x_hat = (q * s) * global, compared with JAX's f4/f8 values decoded by ml_dtypes."""
    rng = np.random.default_rng(1)
    x = rand(rng, (16, 256), 1e-3, 1e3)
    q = quantize(x, "nvfp4")
    jc, js = jax_nvfp4(x, q.global_scale)
    qv = jc.view(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(16, 16, 16)
    sv = js.view(ml_dtypes.float8_e4m3fn).astype(np.float32)[..., None]
    ref = ((qv * sv) * np.float32(q.global_scale)).reshape(16, 256)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref)
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(x))
    assert (err <= np.abs(np.asarray(x)) * 0.25 + np.repeat(sv[..., 0], 16, -1) * float(q.global_scale) * 0.25 + 1e-30).all()


def test_nvfp4_rounding_ties_match_jax():
    """Blocks built so that x' / s is exactly an e2m1 rounding tie (0.25, 0.75, ..., 5) while
    x' * f32(1 / s) is not: JAX's quantizer, as XLA compiles it, multiplies by the reciprocal, and
    so do we (written out explicitly)."""
    e4 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    e4 = np.unique(e4[np.isfinite(e4) & (e4 > 0) & (e4 <= 448)])
    rows, n_recip_differs = [], 0
    for s in e4:
        for t in np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]):
            xv = np.float32(t * s)
            if xv / s != t:
                continue
            blk = np.zeros(16, np.float32)
            blk[0], blk[1], blk[2] = 6 * s, xv, -xv
            rows.append(blk)
            n_recip_differs += np.float32(xv * (np.float32(1) / s)) != t
    assert n_recip_differs > 50
    x = jnp.asarray(np.stack(rows))
    for g in (np.float32(1.0), np.float32(0.5)):
        q = quantize(x * g, "nvfp4", global_scale=g)
        jc, js = jax_nvfp4(x * g, g)
        np.testing.assert_array_equal(bits(q.scales), js)
        np.testing.assert_array_equal(np.asarray(q.codes_unpacked()), jc)


def test_nvfp4_underflowing_blocks_are_exact_zeros():
    rng = np.random.default_rng(2)
    x = np.array(rand(rng, (8, 64), 1.0, 10.0))
    x[:, 16:32] *= 1e-9  # scale underflows e4m3 relative to the global scale
    x[:, 32:48] = 0.0    # all-zero block
    q = quantize(jnp.asarray(x), "nvfp4")
    jc, js = jax_nvfp4(jnp.asarray(x), q.global_scale)
    assert (js[:, 1:3] == 0).all()
    np.testing.assert_array_equal(bits(q.scales), js)
    y = np.asarray(q.dequantize())
    assert (bits(y[:, 16:48]) == 0).all()  # exact +0, not -0 / NaN
    live = np.repeat(js != 0, 16, -1)
    np.testing.assert_array_equal(np.asarray(q.codes_unpacked())[live], jc[live])


# ---------------------------------------------------------------------------------------------
# e2m1 encode/decode vs XLA's convert and ml_dtypes
# ---------------------------------------------------------------------------------------------
def test_e2m1_encode_matches_xla_convert():
    rng = np.random.default_rng(3)
    grid = np.arange(-7.0, 7.0, 0.125)  # every tie and representable point
    special = [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e30, -1e-30, 0.25, 0.2500001, 0.7499999, 5.0,
               5.0000005, 4.9999995]
    x = np.concatenate([grid, special, rng.standard_normal(4000) * 3, rng.uniform(-8, 8, 4000)]).astype(np.float32)
    ours = np.asarray(F.e2m1_encode(x))
    xla = bits(jnp.asarray(x).astype(jnp.float4_e2m1fn))
    np.testing.assert_array_equal(ours, xla)
    assert ours.dtype == np.uint8 and ours.max() <= 15


def test_e2m1_decode_all_codes():
    codes = np.arange(16, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(bits(F.e2m1_decode(codes)), bits(ref))  # incl. -0 for 0x8
    assert F.E2M1_MAX == 6.0 and F.E4M3_MAX == 448.0
    np.testing.assert_array_equal(np.asarray(F.e2m1_encode(ref)), codes)


def test_nvfp4_block_quant_low_level():
    rng = np.random.default_rng(4)
    x = rand(rng, (4, 3, 32))
    g = F.nvfp4_global_scale(x)
    c, s = F.nvfp4_block_quant(x, g)
    assert c.shape == (4, 3, 32) and c.dtype == jnp.uint8 and s.shape == (4, 3, 2) and s.dtype == jnp.float8_e4m3fn
    jc, js = jax_nvfp4(x, g)
    np.testing.assert_array_equal(np.asarray(c), jc)
    np.testing.assert_array_equal(bits(s), js)
    np.testing.assert_array_equal(np.asarray(F.nvfp4_block_dequant(c, s, g)), np.asarray(quantize(x, "nvfp4").dequantize(jnp.float32)))


# ---------------------------------------------------------------------------------------------
# INT4 / INT3 vs numpy reference
# ---------------------------------------------------------------------------------------------
def int_ref(x, bits_, group, axis, scale_dtype=ml_dtypes.bfloat16):
    """numpy reference of the documented spec: f32 ops where the spec says f32 (amax * f32(1/qmax),
    the reciprocal 1/s and x * (1/s)), float64 elsewhere. Returns (int codes [...,K], scales,
    dequantized f32, exact quotient x / s in float64)."""
    qmax = 2 ** (bits_ - 1) - 1
    xl = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    xg = xl.reshape(*xl.shape[:-1], -1, group)
    amax = np.abs(xg).max(-1, keepdims=True)
    s = (amax * (np.float32(1) / np.float32(qmax))).astype(scale_dtype)
    s64 = s.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        quot = (xg * (np.float32(1) / s64.astype(np.float32))).astype(np.float64)
        exact = xg.astype(np.float64) / s64
    q = np.where(s64 > 0, np.clip(np.round(quot), -qmax, qmax), 0.0).astype(np.int8)  # integer codes: no -0
    deq = np.float32(q * s64)  # q * s is exact in f64; one rounding to f32 (only f32 scales round)
    return q.reshape(xl.shape).astype(np.int8), s[..., 0], deq.reshape(xl.shape), exact.reshape(xl.shape)


@pytest.mark.parametrize("fmt", ["int4", "int3"])
@pytest.mark.parametrize("group,shape,axis", [(32, (128, 48), 0), (64, (24, 256), -1), (128, (2, 3, 128), -1),
                                              (64, (3, 192, 4), 1)])
def test_int_vs_numpy_reference(fmt, group, shape, axis):
    rng = np.random.default_rng(hash((fmt, group, shape, axis)) % 2**32)
    bits_ = F.FORMAT_BITS[fmt]
    for dtype in (jnp.bfloat16, jnp.float32):
        x = rand(rng, shape, dtype=dtype)
        q = quantize(x, fmt, group_size=group, axis=axis)
        assert q.global_scale is None and q.scales.dtype == jnp.bfloat16 and q.group_size == group
        rc, rs, rd, exact = int_ref(x, bits_, group, axis % len(shape))
        K = shape[axis]
        assert q.codes.shape == rs.shape[:-1] + (K * bits_ // 8,)
        np.testing.assert_array_equal(bits(q.scales), bits(rs))
        np.testing.assert_array_equal(np.asarray(q.codes_unpacked()), rc)
        got = np.asarray(q.dequantize(jnp.float32))
        np.testing.assert_array_equal(got, np.moveaxis(rd, -1, axis))
        # vs exact float64 round(x / s): only .5 ties (within f32 rounding) may differ, by one step
        true_q = np.clip(np.round(exact), -2 ** (bits_ - 1) + 1, 2 ** (bits_ - 1) - 1)
        diff = rc != true_q
        assert (np.abs(rc - true_q)[diff] == 1).all()
        assert (np.abs(np.abs(exact - np.floor(exact)) - 0.5)[diff] < 1e-6).all()
        assert diff.mean() < 1e-2
        # logical-dtype dequantize = reference rounded to the input dtype
        np.testing.assert_array_equal(bits(q.dequantize()), bits(np.moveaxis(rd, -1, axis).astype(jnp.dtype(q.dtype))))
        # packed layout, checked with numpy bit twiddling
        u = rc.astype(np.uint8)
        if bits_ == 4:
            np.testing.assert_array_equal(np.asarray(q.codes), np_pack4(u))
        else:
            w = (u.reshape(*u.shape[:-1], -1, 8).astype(np.uint32) & 7) << (3 * np.arange(8, dtype=np.uint32))
            w = w.sum(-1, dtype=np.uint32)
            ref_bytes = np.stack([(w >> (8 * i)) & 0xFF for i in range(3)], -1).astype(np.uint8)
            np.testing.assert_array_equal(np.asarray(q.codes), ref_bytes.reshape(*u.shape[:-1], -1))


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.float16])
def test_int_scale_dtypes(scale_dtype):
    rng = np.random.default_rng(5)
    x = rand(rng, (16, 128), 1e-3, 1e3)
    q = quantize(x, "int4", scale_dtype=scale_dtype)
    assert q.scales.dtype == scale_dtype
    rc, rs, rd, _ = int_ref(x, 4, 64, 1, scale_dtype=np.dtype(scale_dtype))
    np.testing.assert_array_equal(bits(q.scales), bits(rs))
    np.testing.assert_array_equal(np.asarray(q.codes_unpacked()), rc)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), rd)


def test_int_low_level_and_round_half_even():
    # amax 7 -> s = 1 exactly; 0.5, 1.5, 2.5, -2.5 are ties -> even
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [7.0, 0.5, 1.5, 2.5, -2.5, -3.5]
    c, s = F.int_group_quant(jnp.asarray(x), 4, 32, jnp.bfloat16)
    assert float(s[0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(c)[0, :6], [7, 0, 2, 2, -2, -4])
    np.testing.assert_array_equal(np.asarray(F.int_group_dequant(c, s)), np.asarray(c, np.float32))


# ---------------------------------------------------------------------------------------------
# packing, consistency properties (hypothesis)
# ---------------------------------------------------------------------------------------------
@HYP
@given(lead=st.sampled_from([(), (3,), (2, 2)]), n=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**31))
def test_pack_roundtrips(lead, n, seed):
    rng = np.random.default_rng(seed)
    c4 = rng.integers(0, 16, (*lead, 2 * n), dtype=np.uint8)
    p4 = F.pack_4bit(c4)
    assert p4.shape == (*lead, n) and p4.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(p4), np_pack4(c4))
    np.testing.assert_array_equal(np.asarray(F.unpack_4bit(p4)), c4)
    s4 = rng.integers(-8, 8, (*lead, 2 * n), dtype=np.int8)
    np.testing.assert_array_equal(np.asarray(F.unpack_4bit(F.pack_4bit(s4), signed=True)), s4)
    c3 = rng.integers(-4, 4, (*lead, 8 * n), dtype=np.int8)
    p3 = F.pack_3bit(c3)
    assert p3.shape == (*lead, 3 * n) and p3.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(F.unpack_3bit(p3, signed=True)), c3)
    np.testing.assert_array_equal(np.asarray(F.unpack_3bit(p3)), c3.astype(np.uint8) & 7)
    b = rng.integers(0, 256, (*lead, 3 * n), dtype=np.uint8)  # every byte string is a valid packing
    np.testing.assert_array_equal(np.asarray(F.pack_3bit(F.unpack_3bit(b))), b)


def test_pack_3bit_layout_example():
    # codes 0..7 -> w = sum k << 3k = 0o76543210 -> bytes little-endian
    w = sum(k << (3 * k) for k in range(8))
    p = np.asarray(F.pack_3bit(np.arange(8, dtype=np.uint8)))
    np.testing.assert_array_equal(p, [w & 0xFF, (w >> 8) & 0xFF, w >> 16])
    np.testing.assert_array_equal(np.asarray(F.pack_4bit(np.array([1, 2], np.uint8))), [0x21])


@HYP
@given(fmt=st.sampled_from(FORMATS), rows=st.sampled_from([1, 3]), kmul=st.sampled_from([1, 2]),
       axis=st.sampled_from([0, -1]), dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       seed=st.integers(0, 2**31), zero_frac=st.sampled_from([0.0, 0.5]))
def test_fake_quant_equals_dequantize(fmt, rows, kmul, axis, dtype, seed, zero_frac):
    rng = np.random.default_rng(seed)
    K = (16 if fmt == "nvfp4" else 64) * kmul
    shape = (K, rows) if axis == 0 else (rows, K)
    hi = 60000.0 if dtype == "float16" else 1e4
    x = np.clip(np.array(rand(rng, shape, 1e-3, hi)), -hi, hi)
    x[rng.random(shape) < zero_frac] = 0.0
    x = jnp.asarray(x, dtype)
    q = quantize(x, fmt, axis=axis)
    y = fake_quant(x, fmt, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape and q.dequantize().dtype == x.dtype
    np.testing.assert_array_equal(bits(y), bits(q.dequantize(x.dtype)))
    assert np.isfinite(np.asarray(y, np.float32)).all()
    # quantizing a quantized tensor's values changes nothing in the codes' meaning (idempotent)
    if fmt != "nvfp4":
        y32 = q.dequantize(jnp.float32)
        np.testing.assert_array_equal(np.asarray(quantize(y32, fmt, axis=axis).dequantize()), np.asarray(y32))


# ---------------------------------------------------------------------------------------------
# memory accounting
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kw,bits_per_elem", [("nvfp4", {}, 4.5), ("int4", {}, 4.25), ("int3", {}, 3.25),
                                                   ("int4", {"group_size": 128}, 4.125)])
def test_memory_savings(fmt, kw, bits_per_elem):
    w = jnp.zeros((3072, 3072), jnp.bfloat16) + jnp.asarray(
        np.random.default_rng(6).standard_normal((3072, 1)), jnp.bfloat16)
    q = quantize(w, fmt, axis=0, **kw)
    ratio = nbytes(w) / q.nbytes
    assert ratio == pytest.approx(16 / bits_per_elem, abs=0.01)
    assert nbytes({"w": q, "b": jnp.zeros(3072, jnp.bfloat16)}) == q.nbytes + 6144
    abstract = jax.eval_shape(lambda: quantize(w, fmt, axis=0, **kw))
    assert isinstance(abstract, QTensor) and isinstance(abstract.codes, jax.ShapeDtypeStruct)
    assert abstract.nbytes == q.nbytes == nbytes(abstract) == nbytes([abstract, None])
    assert nbytes(jax.ShapeDtypeStruct((3072, 3072), jnp.bfloat16)) == nbytes(w)


# ---------------------------------------------------------------------------------------------
# bad input, non-finite values, zeros
# ---------------------------------------------------------------------------------------------
def test_bad_arguments():
    x = jnp.ones((48, 40), jnp.float32)
    with pytest.raises(ValueError, match=r"\(48, 40\).*group_size=16"):
        quantize(x, "nvfp4")  # K = 40
    with pytest.raises(ValueError, match=r"axis 0.*\(48, 40\).*group_size=32"):
        quantize(x, "int4", axis=0, group_size=32)
    with pytest.raises(ValueError, match=r"group_size=64"):
        quantize(jnp.ones((4, 96)), "int3")
    with pytest.raises(ValueError, match=r"nvfp4.*int4.*int3"):
        quantize(x, "fp8")
    with pytest.raises(ValueError, match="16"):
        quantize(jnp.ones((4, 64)), "nvfp4", group_size=32)
    with pytest.raises(ValueError):
        quantize(jnp.ones((4, 64)), "int4", group_size=16)
    with pytest.raises(ValueError):
        quantize(jnp.ones((4, 64)), "int4", global_scale=1.0)
    with pytest.raises(ValueError):
        quantize(jnp.ones((4, 64)), "int4", scale_dtype=jnp.int8)
    with pytest.raises(ValueError):
        quantize(jnp.ones((4, 64)), "nvfp4", scale_dtype=jnp.bfloat16)
    with pytest.raises(ValueError):
        quantize(jnp.ones((4, 64)), "nvfp4", global_scale=jnp.ones(2))
    with pytest.raises(ValueError):
        quantize(jnp.ones((4, 64)), "int4", axis=2)
    with pytest.raises(ValueError):
        quantize(jnp.ones((0, 64)), "int4", axis=0)
    for dt in (jnp.int32, jnp.int8, jnp.bool_):
        with pytest.raises(TypeError):
            quantize(jnp.ones((4, 64), dt), "nvfp4")
        with pytest.raises(TypeError):
            fake_quant(jnp.ones((4, 64), dt), "int4")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_propagates_per_block(fmt, bad):
    rng = np.random.default_rng(7)
    g = 16 if fmt == "nvfp4" else 64
    x = np.array(rand(rng, (4, 4 * g), 1e-2, 1e2))
    xb = x.copy()
    xb[1, g + 3] = bad
    y = np.asarray(quantize(jnp.asarray(xb), fmt).dequantize())
    assert np.isnan(y[1, g:2 * g]).all()  # the whole block is visibly bad
    clean = x.copy()
    clean[1, g:2 * g] = 0.0
    yc = np.asarray(quantize(jnp.asarray(clean), fmt).dequantize())
    mask = np.ones_like(x, bool)
    mask[1, g:2 * g] = False
    np.testing.assert_array_equal(y[mask], yc[mask])  # other blocks untouched (global ignores it)
    assert np.isfinite(y[mask]).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_huge_values_clip_not_nan(dtype):
    x = np.full((2, 64), 1.0, np.float32)
    x[0, :16] = 3.0e38
    x[0, 16] = -1.0e30
    x[1, 5] = 1e20
    x = jnp.asarray(x, dtype)
    for fmt in FORMATS:
        y = np.asarray(quantize(x, fmt).dequantize(jnp.float32))
        assert np.isfinite(y).all(), fmt
        ref = np.asarray(x, np.float32)[0, :16]
        np.testing.assert_allclose(y[0, :16], ref, rtol=0.02, err_msg=fmt)
        if fmt != "nvfp4":  # INT: huge scales are not flushed (1 / s would be subnormal)
            _, _, rd, _ = int_ref(x, F.FORMAT_BITS[fmt], 64, 1)
            np.testing.assert_array_equal(y, rd)
    # nvfp4 with a given (too small) global scale: e4m3 scale clips at 448, codes saturate at 6
    q = quantize(x, "nvfp4", global_scale=1e-3)
    y = np.asarray(q.dequantize(jnp.float32))
    assert np.isfinite(y).all() and np.abs(y).max() == np.float32(6 * 448) * np.float32(1e-3)
    assert (np.asarray(q.scales, np.float32) <= 448).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_zeros_are_exact(fmt):
    z = jnp.zeros((128, 64), jnp.bfloat16)
    q = quantize(z, fmt, axis=0)
    assert (np.asarray(q.codes) == 0).all() and (np.asarray(q.scales, np.float32) == 0).all()
    assert (bits(q.dequantize()) == 0).all() and (bits(fake_quant(z, fmt, axis=0)) == 0).all()
    if fmt == "nvfp4":
        assert float(q.global_scale) == 1.0
    x = np.array(rand(np.random.default_rng(8), (4, 256)))
    x[:, 128:] = 0.0
    x[:, 10] = -0.0
    y = np.asarray(fake_quant(jnp.asarray(x), fmt))
    assert (bits(y[:, 128:]) == 0).all()


# ---------------------------------------------------------------------------------------------
# pytree behaviour: jit, vmap, scan, orbax
# ---------------------------------------------------------------------------------------------
def _assert_q_equal(a, b):
    assert type(a) is QTensor and type(b) is QTensor
    assert (a.fmt, a.group_size, a.shape, a.axis, a.dtype) == (b.fmt, b.group_size, b.shape, b.axis, b.dtype)
    for ca, cb in zip((a.codes, a.scales, a.global_scale), (b.codes, b.scales, b.global_scale)):
        assert (ca is None) == (cb is None)
        if ca is not None:
            assert ca.dtype == cb.dtype and ca.shape == cb.shape
            np.testing.assert_array_equal(bits(ca), bits(cb))


@pytest.mark.parametrize("fmt", FORMATS)
def test_jit(fmt):
    x = rand(np.random.default_rng(9), (128, 32), dtype=jnp.bfloat16)
    q = quantize(x, fmt, axis=0)
    qj = jax.jit(lambda v: quantize(v, fmt, axis=0))(x)
    _assert_q_equal(q, qj)
    deq = jax.jit(lambda t: t.dequantize())(q)
    np.testing.assert_array_equal(bits(deq), bits(q.dequantize()))
    np.testing.assert_array_equal(bits(jax.jit(lambda v: fake_quant(v, fmt, axis=0))(x)), bits(fake_quant(x, fmt, axis=0)))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    _assert_q_equal(jax.tree_util.tree_unflatten(treedef, leaves), q)
    if fmt == "nvfp4":  # traced global scale
        g = jnp.float32(0.01)
        _assert_q_equal(jax.jit(lambda v, s: quantize(v, fmt, global_scale=s))(x, g), quantize(x, fmt, global_scale=g))


@pytest.mark.parametrize("fmt", FORMATS)
def test_vmap_and_scan_over_stacked_layers(fmt):
    L, K, N = 3, 128, 16
    w = rand(np.random.default_rng(10), (L, K, N), dtype=jnp.bfloat16)
    stacked = jax.vmap(lambda v: quantize(v, fmt, axis=0))(w)
    assert stacked.shape == (K, N) and stacked.batch_shape == (L,) and stacked.codes.shape[0] == L
    per_layer = [quantize(w[i], fmt, axis=0) for i in range(L)]
    for i in range(L):
        _assert_q_equal(jax.tree_util.tree_map(lambda c: c[i], stacked), per_layer[i])
    ref = np.stack([np.asarray(p.dequantize(jnp.float32)) for p in per_layer])
    np.testing.assert_array_equal(np.asarray(stacked.dequantize(jnp.float32)), ref)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda q: q.dequantize(jnp.float32))(stacked)), ref)
    assert stacked.codes_unpacked().shape == (L, N, K)

    def body(h, q):
        return h + q.dequantize(jnp.float32).sum(), None

    h, _ = jax.lax.scan(body, jnp.float32(0), stacked)
    assert h == pytest.approx(ref.sum(), rel=1e-5)


def test_orbax_roundtrip(tmp_path):
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(11)
    tree = {
        "nvfp4": quantize(rand(rng, (64, 32), dtype=jnp.bfloat16), "nvfp4", axis=0),
        "int4": quantize(rand(rng, (32, 128)), "int4", group_size=128),
        "int3": quantize(rand(rng, (64, 8), dtype=jnp.bfloat16), "int3", axis=0),
        "bias": jnp.arange(8, dtype=jnp.bfloat16),
    }
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", tree)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
    for k in ("nvfp4", "int4", "int3"):
        _assert_q_equal(restored[k], tree[k])
        np.testing.assert_array_equal(bits(restored[k].dequantize()), bits(tree[k].dequantize()))
    np.testing.assert_array_equal(bits(restored["bias"]), bits(tree["bias"]))
    assert nbytes(restored) == nbytes(tree)


def test_signed_unpack_inside_jitted_dot_regression():
    """XLA CPU (jaxlib 0.10) miscompiled int8 sign extension fused into a dot operand: sum(dot(unpack(pack(a)),
    unpack(pack(b)).T)) under jit came out ~1e8 instead of ~1e4. The float64 numpy product is the reference."""
    from pqjax.formats import pack_4bit, pack_3bit, unpack_3bit, unpack_4bit
    rng = np.random.default_rng(0)
    for bits, pack, unpack in ((4, pack_4bit, unpack_4bit), (3, pack_3bit, unpack_3bit)):
        q = 2 ** (bits - 1) - 1
        a = rng.integers(-q, q + 1, (64, 256)).astype(np.int8)
        b = rng.integers(-q, q + 1, (48, 256)).astype(np.int8)
        perm = rng.permutation(256)

        def f(p):
            ua = unpack(pack(jnp.take(jnp.asarray(a), p, axis=1)), signed=True).astype(jnp.float32)
            ub = unpack(pack(jnp.take(jnp.asarray(b), p, axis=1)), signed=True).astype(jnp.float32)
            return jnp.sum(jnp.dot(ua, ub.T, precision="highest"))

        want = float(np.sum(a[:, perm].astype(np.float64) @ b[:, perm].astype(np.float64).T))
        assert float(jax.jit(f)(jnp.asarray(perm))) == want
