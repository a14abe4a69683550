"""``layers.attention`` (jax.nn.dot_product_attention: cuDNN flash attention on CUDA, blocked XLA elsewhere).

Numerics vs a float64 numpy softmax attention on fresh random inputs, on both the single-block and the blocked XLA
path; the cuDNN path by lowering FLUX / CLIP / T5 for CUDA from this CPU host (the custom call must be there for bf16
and absent for fp32); memory by the compiled CPU forward's temp bytes vs one [B, H, S, S] fp32 logits tensor.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import fresh_seed
from pqjax.models import clip, flux, layers, t5
from pqjax.models.common import is_shape

U32 = 2.0 ** -24  # fp32 unit roundoff
U16 = 2.0 ** -8  # bf16 unit roundoff (8-bit significand)
CUDNN_CALL = re.compile(r"custom_call @__cudnn\$fmha\w*")


def fp32_bound(k: int, depth: int) -> float:
    """tests/tolerances.py's model: ``depth`` chained fp32 reductions of length <= k differ by <= 8 depth sqrt(k) u."""
    return 8.0 * depth * math.sqrt(k) * U32


def reference(q, k, v, bias=None, scale=None, is_causal=False) -> np.ndarray:
    """softmax(q k^T * scale + bias) v in float64 numpy."""
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(jnp.asarray(bias, jnp.float32), np.float64)
    if is_causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


CASES = {  # name: (B, Sq, Sk, H, D, with bias, scale, is_causal)
    "plain": (2, 40, 40, 3, 32, None, None, False),
    "cross": (2, 24, 56, 2, 64, None, None, False),
    "bias_scale1": (2, 40, 40, 3, 32, (1, 3, 40, 40), 1.0, False),
    "bias_key_only": (2, 24, 56, 2, 16, (2, 1, 1, 56), None, False),
    "causal": (2, 40, 40, 3, 32, None, None, True),
    # [1, 2, 2500, 2500] fp32 logits = 50 MB > LOGITS_BLOCK_BYTES: 512-row blocks plus a 452-row remainder
    "blocked": (1, 2500, 2500, 2, 32, None, None, False),
    "blocked_bias": (1, 2500, 2500, 2, 32, (1, 2, 2500, 2500), 1.0, False),
    "blocked_causal": (1, 2500, 2500, 2, 32, None, None, True),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_float64(case, dtype):
    B, Sq, Sk, H, D, bias_shape, scale, is_causal = CASES[case]
    if case.startswith("blocked"):
        assert B * H * Sq * Sk * 4 > layers.LOGITS_BLOCK_BYTES, "the case must exercise the blocked XLA path"
    rng = np.random.default_rng(fresh_seed())
    qk_std = 1.0 if scale is None else D ** -0.25  # logits ~ N(0, 1) either way: the fp32 error model holds
    q = jnp.asarray(rng.standard_normal((B, Sq, H, D)) * qk_std, dtype)
    k = jnp.asarray(rng.standard_normal((B, Sk, H, D)) * qk_std, dtype)
    v = jnp.asarray(rng.standard_normal((B, Sk, H, D)), dtype)
    bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape), dtype)
    out = jax.jit(lambda q, k, v, b: layers.attention(q, k, v, b, scale=scale, is_causal=is_causal))(q, k, v, bias)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = np.abs(np.asarray(out.astype(jnp.float32), np.float64) - reference(q, k, v, bias, scale, is_causal)).max()
    # fp32: QK^T, the softmax sum and PV are three reductions of length <= max(D, Sk), each term <= max|v|.
    bound = fp32_bound(max(D, Sk), 3)
    if dtype == "bfloat16":
        # + the probabilities rounded to bf16 for PV (sum p |delta| |v| <= u max|v|) + the output rounded (u max|v|)
        bound += 2 * U16
    assert err <= bound * float(np.abs(np.asarray(v, np.float32)).max()), (case, dtype, err)


def test_attention_bad_inputs():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=r"implementation must be one of .*'flash'"):
        layers.attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match=r"must share B, H, D; got q \(1, 8, 2, 16\), k \(1, 8, 2, 8\)"):
        layers.attention(q, q[..., :8], q[..., :8])
    with pytest.raises(ValueError, match=r"bias \(1, 2, 8, 7\) does not broadcast to \[B, H, Sq, Sk\] = \[1, 2, 8, 8\]"):
        layers.attention(q, q, q, jnp.zeros((1, 2, 8, 7)))
    # asking for cuDNN never falls back silently: no cuDNN here / fp32 inputs
    with pytest.raises((RuntimeError, NotImplementedError)):
        layers.attention(q, q, q, implementation="cudnn")


# ------------------------------------------------------------------------------------------------
# The cuDNN path, lowered for CUDA from this CPU host
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def cudnn_version(monkeypatch):
    """jax asks the CUDA plugin (absent on a CPU host) only for cuDNN's version; the rest of the CUDA lowering is
    jax's own. Pretend cuDNN 9.8 is installed."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)


def param_shapes(layout: dict, dtype) -> dict:
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, dtype), layout, is_leaf=is_shape)


def lowered(fn, *args, platform: str) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def flux_args(cfg: flux.FluxConfig, dtype, B: int, n_img: int, n_txt: int):
    sds = jax.ShapeDtypeStruct
    params = flux.param_shapes(cfg, dtype)
    inputs = dict(hidden_states=sds((B, n_img, cfg.in_channels), dtype),
                  encoder_hidden_states=sds((B, n_txt, cfg.joint_attention_dim), dtype),
                  pooled_projections=sds((B, cfg.pooled_projection_dim), dtype), timestep=sds((B,), jnp.float32),
                  img_ids=sds((n_img, 3), jnp.float32), txt_ids=sds((n_txt, 3), jnp.float32),
                  guidance=sds((B,), jnp.float32))
    return params, inputs


@pytest.mark.usefixtures("cudnn_version")
def test_flux_lowers_to_cudnn_flash_attention_for_bf16():
    cfg = flux.FluxConfig.tiny()
    B, n_img, n_txt = 1, 64, 8
    S, H = n_img + n_txt, cfg.num_attention_heads
    fwd = lambda p, a: flux.forward(cfg, p, **a)
    text = lowered(fwd, *flux_args(cfg, jnp.bfloat16, B, n_img, n_txt), platform="cuda")
    calls = [line for line in text.splitlines() if CUDNN_CALL.search(line)]
    assert len(calls) == cfg.num_layers + cfg.num_single_layers
    # bf16 operands (nothing upcast on the way in), flash attention, and no [B, H, S, S] logits anywhere
    qkv = f"tensor<{B}x{S}x{H}x{cfg.attention_head_dim}xbf16>"
    assert all(line.count(qkv) >= 3 and "is_flash_attention\\22: true" in line for line in calls)
    assert f"tensor<{B}x{H}x{S}x{S}x" not in text
    # fp32 (cuDNN serves bf16/fp16 only) and any non-CUDA platform: the XLA path
    assert not CUDNN_CALL.search(lowered(fwd, *flux_args(cfg, jnp.float32, B, n_img, n_txt), platform="cuda"))
    assert not CUDNN_CALL.search(lowered(fwd, *flux_args(cfg, jnp.bfloat16, B, n_img, n_txt), platform="cpu"))


@pytest.mark.usefixtures("cudnn_version")
def test_text_encoders_lower_to_cudnn_with_causal_mask_and_bias():
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    ccfg = clip.CLIPTextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2)
    cparams = param_shapes(clip.param_layout(ccfg), jnp.bfloat16)
    calls = CUDNN_CALL.findall(text := lowered(lambda p, i: clip.forward(ccfg, p, i), cparams, ids, platform="cuda"))
    assert len(calls) == ccfg.num_hidden_layers and "mask_type\\22: \\22CAUSAL" in text
    tcfg = t5.T5EncoderConfig(vocab_size=64, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)
    tparams = param_shapes(t5.param_layout(tcfg), jnp.bfloat16)
    calls = CUDNN_CALL.findall(lowered(lambda p, i: t5.forward(tcfg, p, i), tparams, ids, platform="cuda"))
    assert calls == ["custom_call @__cudnn$fmhaScaleBiasSoftmax"] * tcfg.num_layers  # the position bias as cuDNN bias


@pytest.mark.usefixtures("cudnn_version")
@pytest.mark.parametrize("D, expect_cudnn", [(128, True), (512, False)])
def test_head_dim_cudnn_cannot_serve_falls_back_to_xla(D, expect_cudnn):
    """The VAE's mid-block attention is one 512-wide head: beyond cuDNN's limit (128; 256 on Hopper), so XLA."""
    x = jax.ShapeDtypeStruct((1, 64, 1, D), jnp.bfloat16)
    assert bool(CUDNN_CALL.search(lowered(layers.attention, x, x, x, platform="cuda"))) == expect_cudnn


# ------------------------------------------------------------------------------------------------
# Memory of the XLA path
# ------------------------------------------------------------------------------------------------

def test_flux_forward_does_not_hold_full_logits(monkeypatch):
    """Compiled CPU forward at 64x64 latent patches + 64 text tokens (S = 4160): [1, 8, S, S] fp32 = 554 MB of
    logits per block unblocked; blocked, one block of rows is LOGITS_BLOCK_BYTES (16 MiB). The temp bytes must stay
    below 1/8 of one logits tensor, and the same forward with blocking disabled must exceed one (the measure sees
    materialized logits)."""
    cfg = flux.FluxConfig.tiny(num_attention_heads=8, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    B, n_img, n_txt = 1, 4096, 64
    S, H = n_img + n_txt, cfg.num_attention_heads
    logits_bytes = B * H * S * S * 4
    args = flux_args(cfg, jnp.bfloat16, B, n_img, n_txt)

    def temp_bytes() -> int:
        fwd = jax.jit(lambda p, a: flux.forward(cfg, p, **a))  # a fresh function: LOGITS_BLOCK_BYTES is read at trace
        with jax.default_device(jax.devices("cpu")[0]):  # the XLA path, also on a host with a GPU
            return fwd.trace(*args).lower().compile().memory_analysis().temp_size_in_bytes

    blocked = temp_bytes()
    monkeypatch.setattr(layers, "LOGITS_BLOCK_BYTES", 2 * logits_bytes)
    unblocked = temp_bytes()
    assert blocked < logits_bytes / 8 < logits_bytes <= unblocked, (blocked, unblocked, logits_bytes)
