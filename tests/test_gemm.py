"""The packed x packed W4A4 GEMM (and W4A16): decoders, kernel (interpret mode) vs XLA reference, lowering.

* The PTX decoders of :mod:`pallas_kernels._decode` cannot run on a CPU: a small emulator of the few PTX
  instructions they use runs the asm strings on every code byte and is compared with the jnp twin the
  interpret path uses; the twin itself is compared with pqjax.formats (float64) on all 256 x 256 byte pairs.
* ``w4a4_matmul(xq, w)`` vs ``reference.w4a4_matmul_packed`` on fresh random inputs (perm / Hadamard /
  smoothing in the activation, split-K on and off, ragged M, leading dims): equal up to fp32 accumulation,
  ``|out - ref| <= (K + 3) * 2^-24 * (|x| @ |w|)`` (fp32 accumulation of K exact terms; INT rounds each
  group's term up to 3 more times).
"""
from __future__ import annotations

import os
import re
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _decode as dec
from pallas_kernels import gpu_check, reference, triton_kernels
from pqjax.formats import e2m1_decode, quantize

SEED = int(os.environ.get("PQJAX_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))


def _rng(*salt):
    return np.random.default_rng([SEED, *[zlib.crc32(str(s).encode()) for s in salt]])


# --------------------------------------------------------------------------------------------
# a tiny PTX emulator for the decoders' instructions (uint32 numpy lanes)
# --------------------------------------------------------------------------------------------
def _prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:  # sign-replicate mode
            byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
        out |= (byte & 0xFF) << (8 * i)
    return out


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for i in range(8):
        if (lut >> i) & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out


def _mul_f16x2(a, b):
    def halves(v):
        return [(v >> s & 0xFFFF).astype(np.uint16).view(np.float16) for s in (0, 16)]

    lo = (halves(a)[0].astype(np.float32) * halves(b)[0].astype(np.float32)).astype(np.float16)
    hi = (halves(a)[1].astype(np.float32) * halves(b)[1].astype(np.float32)).astype(np.float16)
    return lo.view(np.uint16).astype(np.uint32) | (hi.view(np.uint16).astype(np.uint32) << 16)


def run_ptx(asm: str, inputs: dict) -> dict:
    """Execute ``asm`` (operands ``$i`` and ``.reg`` names) on uint32 lanes; returns every register."""
    regs = {k: np.asarray(v, np.uint32) for k, v in inputs.items()}

    def val(tok):
        tok = tok.strip()
        return np.uint32(int(tok, 0)) if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok) else regs[tok]

    for stmt in asm.replace("{", ";").replace("}", ";").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        d, srcs = args[0], [val(t) for t in args[1:]]
        if op == "prmt.b32":
            r = _prmt(*srcs)
        elif op == "shl.b32":
            r = srcs[0] << srcs[1]
        elif op == "shr.b32":
            r = srcs[0] >> srcs[1]
        elif op == "and.b32":
            r = srcs[0] & srcs[1]
        elif op == "lop3.b32":
            r = _lop3(srcs[0], srcs[1], srcs[2], int(srcs[3]))
        elif op == "mul.rn.f16x2":
            r = _mul_f16x2(srcs[0], srcs[1])
        else:
            raise NotImplementedError(op)
        regs[d] = np.asarray(r, np.uint32) & np.uint32(0xFFFFFFFF)
    return regs


def _f16_bits(v):
    return np.asarray(v, np.float16).view(np.uint16).astype(np.uint32)


def test_nvfp4_asm_equals_jnp_twin_on_every_byte():
    rng = _rng("asm-nvfp4")
    n = 4096
    codes = rng.integers(0, 256, (n, 4)).astype(np.uint8)
    codes[:256, 0] = np.arange(256)  # every byte value in every lane
    codes[:256, 1] = np.arange(256)[::-1]
    codes[256:512, 2] = np.arange(256)
    codes[512:768, 3] = np.arange(256)
    e4m3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float16)
    e4m3 = e4m3[np.isfinite(e4m3)]
    scales = rng.choice(e4m3, (n, 4)).astype(np.float16)
    packed = codes.astype(np.uint32) @ (np.uint32(1) << (8 * np.arange(4, dtype=np.uint32)))
    sbits = _f16_bits(scales)
    inputs = {"$2": packed, "$3": sbits[:, 0] | sbits[:, 1] << 16, "$4": sbits[:, 2] | sbits[:, 3] << 16}
    twin = [np.asarray(v) for v in jax.jit(lambda c, s: dec.nvfp4_planes(c, s, asm=False))(codes, scales)]
    for nib, plane in zip(("lo", "hi"), twin):
        out = run_ptx(dec.NVFP4_ASM[nib], inputs)
        got = np.stack([out["$0"] & 0xFFFF, out["$0"] >> 16, out["$1"] & 0xFFFF, out["$1"] >> 16], axis=1)
        np.testing.assert_array_equal(got, _f16_bits(plane), err_msg=nib)


def test_int4_asm_equals_jnp_twin_on_every_byte():
    codes = np.stack([np.arange(256), np.arange(256)[::-1], (np.arange(256) * 7) % 256,
                      (np.arange(256) * 13) % 256], axis=1).astype(np.uint8)
    packed = codes.astype(np.uint32) @ (np.uint32(1) << (8 * np.arange(4, dtype=np.uint32)))
    twin = [np.asarray(v) for v in jax.jit(lambda c: dec.int4_planes_s8(c, asm=False))(codes)]
    for nib, plane in zip(("lo", "hi"), twin):
        out = run_ptx(dec.INT4_ASM[nib], {"$1": packed})["$0"]
        got = np.stack([(out >> (8 * i)) & 0xFF for i in range(4)], axis=1).astype(np.uint8).view(np.int8)
        np.testing.assert_array_equal(got, plane, err_msg=nib)


def test_twins_against_formats_exhaustively():
    """Every code byte x every e4m3 scale: the fp16 planes are exactly e2m1 * scale * 2^-14; int4 is 16 * code."""
    b = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
    s = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
    s16 = jax.jit(dec.e4m3_to_f16)(s)
    lo, hi = jax.jit(lambda c, sc: dec.nvfp4_planes(c, sc, asm=False))(b, s16)
    sv = s.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    for plane, code in ((lo, b & 15), (hi, b >> 4)):
        exp = np.asarray(e2m1_decode(code), np.float64) * sv * 2.0 ** -14
        got = np.asarray(plane, np.float64)
        assert (np.isnan(got) == np.isnan(exp)).all()
        np.testing.assert_array_equal(got[~np.isnan(exp)], exp[~np.isnan(exp)])
    lo8, hi8 = jax.jit(lambda c: dec.int4_planes_s8(c, asm=False))(b[:, 0])
    signed = lambda n: ((n.astype(np.int32) ^ 8) - 8)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(lo8), 16 * signed(b[:, 0] & 15))
    np.testing.assert_array_equal(np.asarray(hi8), 16 * signed(b[:, 0] >> 4))


# --------------------------------------------------------------------------------------------
# packed x packed GEMM: kernel (interpret) vs reference
# --------------------------------------------------------------------------------------------
def _operands(fmt, g, m_shape, k, n, *, salt, perm=False, had=False, smooth=False):
    rng = _rng(salt)
    m = int(np.prod(m_shape))
    x = rng.standard_normal((m, k)) * np.exp(rng.standard_normal((1, k)))
    x[1, :48] = 0.0
    x[2, :] = 0.0
    x = jnp.asarray(x.reshape(*m_shape, k), jnp.bfloat16)
    w = quantize(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32), fmt, axis=0, group_size=g)
    gx = jnp.float32(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 2688 * 4) if fmt == "nvfp4" else None
    kw = dict(global_scale=gx,
              perm=jnp.asarray(rng.permutation(k).astype(np.int32)) if perm else None,
              smooth=jnp.asarray(np.exp(0.3 * rng.standard_normal(k)), jnp.float32) if smooth else None)
    xq = jax.jit(lambda x, kw: reference.quantize_activation(x, fmt, group_size=g, hadamard=had, **kw))(x, kw)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return xq, w, bias


def _bound(xq, w):
    xv, gx = reference.dequantize_act_parts(xq)
    wv, gw = reference.dequantize_weight_parts(w)
    b = np.abs(np.asarray(xv, np.float64)) @ np.abs(np.asarray(wv, np.float64)).T
    return b * (1.0 if gx is None else float(gx) * float(gw))


PACKED = [  # (fmt, group, M shape, K, N, perm, had, smooth, blocks)
    ("nvfp4", None, (77,), 256, 128, False, False, False, None),
    ("nvfp4", None, (2, 40), 512, 64, True, True, True, dict(split_k=1)),
    ("nvfp4", None, (130,), 256, 256, False, False, False, dict(block_m=128, block_n=256, split_k=2)),
    ("int4", 64, (77,), 256, 128, True, False, False, None),
    ("int4", 128, (40,), 512, 64, False, True, False, dict(block_k=256)),
    ("int4", 32, (64,), 128, 64, False, False, True, dict(split_k=1)),
    ("int3", 64, (50,), 256, 64, False, False, False, None),
]


@pytest.mark.parametrize("case", PACKED, ids=lambda c: f"{c[0]}{'' if c[1] is None else f'g{c[1]}'}-"
                         f"{'x'.join(map(str, c[2]))}x{c[3]}x{c[4]}-{c[8]}")
def test_packed_gemm_kernel_vs_reference(case):
    fmt, g, mshape, k, n, perm, had, smooth, blocks = case
    xq, w, bias = _operands(fmt, g, mshape, k, n, salt=str(case), perm=perm, had=had, smooth=smooth)
    f_k = jax.jit(lambda xq, w, b: triton_kernels.w4a4_packed(xq, w, bias=b, out_dtype=jnp.float32, interpret=True,
                                                              blocks=blocks))
    f_r = jax.jit(lambda xq, w, b: reference.w4a4_matmul_packed(xq, w, bias=b, out_dtype=jnp.float32))
    out_k, out_r = f_k(xq, w, bias), f_r(xq, w, bias)
    assert out_k.shape == out_r.shape == (*mshape, n)
    ok_, or_ = np.asarray(out_k, np.float64).reshape(-1, n), np.asarray(out_r, np.float64).reshape(-1, n)
    tol = (k + 3) * 2.0 ** -24 * _bound(xq, w) + 1e-30
    err = np.abs(ok_ - or_)
    assert (err <= tol).all(), f"max err/tol {np.max(err / tol):.3g} (seed {SEED})"
    np.testing.assert_array_equal(ok_[2], np.asarray(bias))  # a zero activation row gives exactly the bias
    # the dispatcher: same result through pk.w4a4_matmul with the packed xq
    with pk.use_impl("interpret"):
        out_d = jax.jit(lambda xq, w, b: pk.w4a4_matmul(xq, w, bias=b, out_dtype=jnp.float32))(xq, w, bias)
    assert (np.abs(np.asarray(out_d, np.float64).reshape(-1, n) - or_) <= tol).all()


def test_packed_equals_float_path():
    """quantize_activation + packed GEMM == w4a4_matmul on the float x (both impls): the model may share xq."""
    rng = _rng("float-vs-packed")
    x = jnp.asarray(rng.standard_normal((3, 21, 256)), jnp.bfloat16)
    w = quantize(jnp.asarray(rng.standard_normal((256, 64)) * 0.05, jnp.float32), "nvfp4", axis=0)
    gx = jnp.float32(0.002)
    for impl in ("interpret", "xla"):
        with pk.use_impl(impl):
            a = jax.jit(lambda x, w, g: pk.w4a4_matmul(x, w, act_global_scale=g, hadamard=True))(x, w, gx)
            b = jax.jit(lambda x, w, g: pk.w4a4_matmul(pk.quantize_activation(x, "nvfp4", global_scale=g,
                                                                              hadamard=True), w))(x, w, gx)
        assert a.shape == b.shape == (3, 21, 64) and a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_packed_bad_inputs():
    x = jnp.ones((8, 128), jnp.bfloat16)
    w4 = quantize(jnp.ones((128, 64)), "int4", axis=0, group_size=64)
    wn = quantize(jnp.ones((128, 64)), "nvfp4", axis=0)
    xq_n = pk.quantize_activation(x, "nvfp4", global_scale=1.0)
    xq_4 = pk.quantize_activation(x, "int4", group_size=32)
    for impl in ("interpret", "xla"):
        with pytest.raises(ValueError, match=r"xq is nvfp4 .* of shape \(8, 128\) but w is int4"):
            pk.w4a4_matmul(xq_n, w4, impl=impl)
        with pytest.raises(ValueError, match=r"group 32.*group 64"):
            pk.w4a4_matmul(xq_4, w4, impl=impl)
        with pytest.raises(ValueError, match=r"xq of shape \(8, 128\) does not match the kernel \[K=256"):
            pk.w4a4_matmul(xq_n, quantize(jnp.ones((256, 64)), "nvfp4", axis=0), impl=impl)
        with pytest.raises(ValueError, match="already carries them"):
            pk.w4a4_matmul(xq_n, wn, act_global_scale=1.0, impl=impl)
        with pytest.raises(TypeError, match="QTensor"):
            pk.w4a4_matmul(xq_n, jnp.ones((128, 64)), impl=impl)


def test_split_k_rule_fills_the_gpu():
    assert triton_kernels.split_k_rule(24, 48) == 8  # M=64, N=3072 (128-wide tiles), K=3072 in steps of 64
    assert triton_kernels.split_k_rule(432, 48) == 1  # M=4608: no split
    assert triton_kernels.split_k_rule(1, 4) == 2  # at least 2 K steps per split


# --------------------------------------------------------------------------------------------
# GPU path compiles; small M fills 132 SMs
# --------------------------------------------------------------------------------------------
GPU = [  # (op, fmt, group, M, K, N)
    ("w4a4", "nvfp4", None, 4608, 3072, 3072),
    ("w4a4", "nvfp4", None, 64, 3072, 3072),
    ("w4a4", "int4", 64, 64, 3072, 3072),
    ("w4a4", "int4", 128, 64, 3072, 3072),
    ("w4a4", "int3", 64, 64, 3072, 3072),
    ("w4a16", "nvfp4", None, 64, 3072, 3072),
    ("w4a16", "int4", 64, 64, 3072, 3072),
    ("w4a16", "nvfp4", None, 2, 3072, 18432),
]


def _lower(c, x_dtype=jnp.bfloat16):
    op, fmt, g, m, k, n = c
    w = jax.eval_shape(lambda: quantize(jnp.zeros((k, n), jnp.float32), fmt, axis=0, group_size=g))
    x = jax.ShapeDtypeStruct((m, k), x_dtype)
    gx = jax.ShapeDtypeStruct((), jnp.float32)
    if op == "w4a16":
        def f(x, w):
            with pk.use_impl("triton"):
                return pk.w4a16_matmul(x, w)

        return gpu_check.lower_for_cuda(f, x, w)
    xq = jax.eval_shape(lambda x, gg: reference.quantize_activation(
        x, fmt, global_scale=gg if fmt == "nvfp4" else None, group_size=g), x, gx)

    def f(xq, w):
        with pk.use_impl("triton"):
            return pk.w4a4_matmul(xq, w)

    return gpu_check.lower_for_cuda(f, xq, w)


@pytest.mark.parametrize("config", GPU, ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}x{c[4]}x{c[5]}")
def test_packed_lowers_and_fills_the_gpu(config):
    (mod,) = gpu_check.triton_modules(_lower(config))
    assert "tt.dot" in mod.ttir and "f8E4M3" not in mod.ttir
    gx, gy, gz = mod.grid
    assert gx * gy * gz >= triton_kernels.NUM_SMS, mod.grid
    if config[1] != "int3" and config[0] == "w4a4":
        assert "elementwise_inline_asm" in mod.ttir  # the packed-register decoders


@pytest.mark.parametrize("config", [GPU[1], GPU[2], GPU[5]], ids=lambda c: f"{c[0]}-{c[1]}")
def test_packed_compiles_to_cubin(config):
    if not gpu_check.have_triton():
        pytest.skip("the `triton` package is not installed (pip install triton)")
    (mod,) = gpu_check.triton_modules(_lower(config))
    for cc in (90, 80):
        kern = gpu_check.compile_ttir(mod, cc)
        assert kern.asm["cubin"] and ".entry" in kern.asm["ptx"], cc
        assert ("wgmma" in kern.asm["ptx"]) == (cc == 90)


def test_blackwell_scaled_matmul_lowers_to_block_scaled_dot():
    """impl="cudnn" (auto on compute capability >= 10.0): NVFP4 W4A4 is jax.nn.scaled_matmul's block-scaled dot."""
    cfg = ("w4a4", "nvfp4", None, 256, 512, 128)
    w = jax.eval_shape(lambda: quantize(jnp.zeros((512, 128), jnp.float32), "nvfp4", axis=0))
    x = jax.ShapeDtypeStruct((2, 128, 512), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((128,), jnp.float32)

    def f(x, w, b):
        with pk.use_impl("cudnn"):
            return pk.w4a4_matmul(x, w, bias=b, act_global_scale=jnp.float32(0.01))

    text = gpu_check.lower_for_cuda(f, x, w, b).as_text()
    assert "block_scaled_dot" in text and "f4E2M1FN" in text, cfg
    assert len(gpu_check.triton_modules(gpu_check.lower_for_cuda(f, x, w, b))) == 1  # only the activation pass
    with pk.use_impl("cudnn"):  # INT formats keep the Triton kernels
        w4 = jax.eval_shape(lambda: quantize(jnp.zeros((512, 128), jnp.float32), "int4", axis=0))
        assert "block_scaled_dot" not in str(jax.make_jaxpr(lambda x, w: pk.w4a4_matmul(x, w))(x, w4))


def test_bench_dry_run_writes_every_table(tmp_path, capsys):
    """The GPU script's code path on CPU: interpret mode, tiny shapes; every table lands in --out."""
    from pallas_kernels import bench

    out = tmp_path / "bench.md"
    assert bench.main(["--dry-run", "--out", str(out), "--reps", "1", "--rounds", "1"]) == 0
    text = out.read_text()
    for title in ("Kernels vs XLA reference", "GEMMs", "FLUX.1-dev-shaped blocks", "FLUX.1-dev-shaped forward"):
        assert title in text, title
    assert "FAIL" not in text and text.count("PASS") == 5
