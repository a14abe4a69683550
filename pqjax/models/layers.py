"""Shared building blocks for the functional models: linear (float or quantized), norms, RoPE, embeddings.

A linear's params are ``{"kernel": [in, out], "bias": [out]}``. After ``pqjax.quantize`` the kernel is a packed
``pqjax.formats.QTensor``; the presence of ``"act_quant"`` (a :class:`pqjax.formats.ActQuant`) makes the layer
W4A4, its absence with a quantized kernel makes it weight-only W4A16. Both run through ``pallas_kernels``' dispatcher.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

Tap = Optional[Callable[[str, jax.Array], None]]


def is_quantized(kernel) -> bool:
    return hasattr(kernel, "fmt") and hasattr(kernel, "codes")


def dense(p: dict, x: jax.Array, name: str = "", tap: Tap = None) -> jax.Array:
    """``x @ kernel + bias`` for float, W4A4 or W4A16 params; ``tap(name, x)`` sees the input (calibration)."""
    if tap is not None:
        tap(name, x)
    kernel, bias = p["kernel"], p.get("bias")
    if is_quantized(kernel):
        import pallas_kernels  # local import: float-only use never needs the kernels

        act = p.get("act_quant")
        if act is not None and act.smooth is not None:
            x = (x * act.smooth).astype(x.dtype)
        if act is None:
            return pallas_kernels.w4a16_matmul(x, kernel, bias=bias, out_dtype=x.dtype)
        return pallas_kernels.w4a4_matmul(x, kernel, bias=bias, act_global_scale=act.global_scale,
                                          hadamard=act.hadamard, out_dtype=x.dtype)
    if kernel.shape[0] != x.shape[-1]:
        raise ValueError(f"linear {name or '?'}: input has {x.shape[-1]} features, kernel expects {kernel.shape[0]}")
    y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _is_w4a4(p: dict) -> bool:
    return is_quantized(p["kernel"]) and p.get("act_quant") is not None


def dense_site(ps: Sequence[dict], x: jax.Array, names: Sequence[str], tap: Tap = None, perm=None) -> list:
    """The linears ``ps`` that all read one activation ``x`` (a site), in the site's channel order ``perm``.

    W4A4 consumers get ONE packed activation (``pallas_kernels.quantize_activation``: the gather by ``perm``,
    smoothing, rotation and quantization fused in one pass, with the first W4A4 consumer's
    :class:`pqjax.formats.ActQuant`, which ``pqjax.stages.pack`` shares between them) and run the packed x packed GEMM. Float and weight-only
    consumers, and calibration (``tap``), read ``x[..., perm]`` materialized once. Returns the outputs in order.
    """
    q = [p for p in ps if _is_w4a4(p)] if tap is None else []
    xq = None
    if q:
        import pallas_kernels

        act, k = q[0]["act_quant"], q[0]["kernel"]
        nv = k.fmt == "nvfp4"
        xq = pallas_kernels.quantize_activation(
            x, k.fmt, global_scale=act.global_scale if nv else None, perm=perm, hadamard=act.hadamard,
            smooth=act.smooth, group_size=k.group_size, scale_dtype=None if nv else k.scales.dtype)
    xs = None
    outs = []
    for p, name in zip(ps, names):
        if xq is not None and _is_w4a4(p):
            import pallas_kernels

            outs.append(pallas_kernels.w4a4_matmul(xq, p["kernel"], bias=p.get("bias"), out_dtype=x.dtype))
            continue
        if xs is None:
            xs = x if perm is None else jnp.take(x, perm, axis=-1)
        outs.append(dense(p, xs, name, tap))
    return outs


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (statistics in fp32)."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(p: dict, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * p["scale"].astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`` (fp32)."""
    half = dim // 2
    freqs = jnp.exp((-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / half)  # diffusers' op order
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(ids: jax.Array, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """FluxPosEmbed: per-axis 1-D rotary tables, interleaved (repeat_interleave), concatenated. ids: [S, n_axes]."""
    pos = ids.astype(jnp.float32)
    cos, sin = [], []
    for i, d in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        ang = pos[:, i:i + 1] * freqs[None, :]
        cos.append(jnp.repeat(jnp.cos(ang), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(ang), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, H, D]; rotates interleaved (real, imag) pairs like diffusers ``apply_rotary_emb(use_real_unbind_dim=-1)``."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


#: fp32 logits one block of query rows may hold on the XLA path (16 MiB: cache-sized on CPU; FLUX at 1024^2 holds
#: [24, 4608, 4608] = 2 GB without blocking).
LOGITS_BLOCK_BYTES = 16 << 20

_IMPLEMENTATIONS = (None, "xla", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, *,
              scale: float | None = None, is_causal: bool = False,
              implementation: str | None = None) -> jax.Array:
    """``softmax(q k^T * scale + bias) v`` through ``jax.nn.dot_product_attention``, [B, S, H, D] in and out.

    ``bias`` broadcasts to [B, H, Sq, Sk] (T5's relative positions); ``is_causal`` masks key j > query i (CLIP);
    ``scale`` defaults to ``1/sqrt(D)``. Logits and softmax are fp32 on every path; the probabilities are rounded to
    ``v.dtype`` for the PV product (fp32 accumulation), the output to ``q.dtype``.

    ``implementation``: ``"cudnn"`` is cuDNN flash attention (no logits in memory; bf16/fp16, head dim a multiple of
    8 up to 128, 256 on Hopper, a bias of q's dtype); ``"xla"`` is JAX's reference computation run over blocks of
    query rows so that at most :data:`LOGITS_BLOCK_BYTES` of fp32 logits are live; ``None`` picks by the platform the
    function is lowered for: cuDNN on CUDA where cuDNN serves these inputs, XLA everywhere else (CPU, fp32, the VAE's
    512-wide head). jax's own ``implementation=None`` always means XLA, hence the choice here.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or (q.shape[0], q.shape[2:]) != (k.shape[0], k.shape[2:]):
        raise ValueError(f"attention: q [B, Sq, H, D] and k, v [B, Sk, H, D] must share B, H, D; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if bias is not None and (bias.ndim > 4 or any(
            b not in (1, n) for b, n in zip(bias.shape[::-1], (k.shape[1], q.shape[1], q.shape[2], q.shape[0])))):
        raise ValueError(f"attention: bias {tuple(bias.shape)} does not broadcast to [B, H, Sq, Sk] = "
                         f"{[q.shape[0], q.shape[2], q.shape[1], k.shape[1]]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cudnn = functools.partial(_cudnn_attention, scale=scale, is_causal=is_causal)
    xla = functools.partial(_xla_attention, scale=scale, is_causal=is_causal)
    if implementation == "cudnn":
        return cudnn(q, k, v, bias)
    if implementation == "xla" or not _cudnn_serves(cudnn, q, k, v, bias):
        return xla(q, k, v, bias)
    # the branch is chosen when lowering: cuDNN for CUDA, XLA for any other platform
    return jax.lax.platform_dependent(q, k, v, bias, cuda=cudnn, default=xla)


def _cudnn_attention(q, k, v, bias, *, scale: float, is_causal: bool) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, bias, scale=scale, is_causal=is_causal, implementation="cudnn")


def _cudnn_serves(cudnn: Callable, q, k, v, bias) -> bool:
    """Whether jax's cuDNN attention accepts these inputs (it checks the cuDNN install, dtypes and head dim when it
    traces). A bias must already have q's dtype: cuDNN takes it in q's dtype, and rounding fp32 to bf16 would change
    the numerics."""
    if bias is not None and bias.dtype != q.dtype:
        return False
    args = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v, bias)]
    try:
        jax.eval_shape(cudnn, *args)
    except (RuntimeError, NotImplementedError, ValueError):  # no cuDNN in this jax install, or unsupported inputs
        return False
    return True


def _xla_attention(q, k, v, bias, *, scale: float, is_causal: bool) -> jax.Array:
    """jax's XLA attention over blocks of query rows: each row's softmax is independent of the others, so blocking
    changes only the GEMM shapes (fp32 summation order) and how much of [B, H, Sq, Sk] is live at once."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    rows = LOGITS_BLOCK_BYTES // (B * H * Sk * 4)
    if rows >= Sq:
        return jax.nn.dot_product_attention(q, k, v, bias, scale=scale, is_causal=is_causal, implementation="xla")
    rows = 1 << (max(rows, 1).bit_length() - 1)  # a power of two: even GEMM tiles

    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    per_row_bias = bias is not None and bias.shape[2] != 1

    def one_row(i):  # rows are read in place (no transposed copy of q or of T5's [1, H, L, L] bias)
        q_i = jax.lax.dynamic_index_in_dim(q, i, axis=1)
        bias_i = jax.lax.dynamic_index_in_dim(bias, i, axis=2) if per_row_bias else bias
        mask = (jnp.arange(Sk) <= i)[None, None, None, :] if is_causal else None
        return jax.nn.dot_product_attention(q_i, k, v, bias_i, mask, scale=scale, implementation="xla")[:, 0]

    out = jax.lax.map(one_row, jnp.arange(Sq), batch_size=rows)
    return jnp.swapaxes(out, 0, 1)
