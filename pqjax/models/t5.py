"""T5 encoder (transformers' ``T5EncoderModel``, v1.1: gated-GELU FFN) as pure JAX functions: FLUX's ``text_encoder_2/``.

Pre-norm blocks with RMSNorm (``T5LayerNorm``), unscaled attention logits plus a learned relative position bias
(computed by block 0, shared by all blocks), no biases anywhere. Parameters are keyed like the state dict, e.g.
``params["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["kernel"]`` (``[in, out]``); the input
embedding is ``params["shared"]["embedding"]`` (checkpoints store it as ``shared.weight`` and/or the tied
``encoder.embed_tokens.weight``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.models.common import ACTIVATIONS, activation, embed, random_params
from pqjax.models.layers import attention, dense, rms_norm

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The ``T5Config`` fields the encoder uses (defaults: T5 v1.1 XXL, FLUX's ``text_encoder_2``)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5EncoderConfig: unsupported feed_forward_proj {self.feed_forward_proj!r} "
                             f"(expected 'ACT' or 'gated-ACT', ACT in {sorted(ACTIVATIONS)})")

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # transformers' T5Config: "gated-gelu" means the tanh approximation (gelu_new)
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5EncoderConfig":
        """From a ``config.json`` dict; missing keys take transformers' ``T5Config`` defaults (t5-small's)."""
        hf_defaults = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           layer_norm_epsilon=1e-6, feed_forward_proj="relu")
        return cls(**{k: v if d.get(k) is None else d[k] for k, v in hf_defaults.items()})


def param_layout(config: T5EncoderConfig) -> Params:
    """Nested dict of parameter shapes (tuples), keyed like ``T5EncoderModel``'s state dict."""
    c, D, I = config, config.d_model, config.inner_dim
    lin = lambda a, b: {"kernel": (a, b)}

    def block(i):
        attn = {"q": lin(D, I), "k": lin(D, I), "v": lin(D, I), "o": lin(I, D)}
        if i == 0:
            attn["relative_attention_bias"] = {"embedding": (c.relative_attention_num_buckets, c.num_heads)}
        ff = ({"wi_0": lin(D, c.d_ff), "wi_1": lin(D, c.d_ff)} if c.is_gated_act else {"wi": lin(D, c.d_ff)})
        ff["wo"] = lin(c.d_ff, D)
        return {"layer": {"0": {"SelfAttention": attn, "layer_norm": {"scale": (D,)}},
                          "1": {"DenseReluDense": ff, "layer_norm": {"scale": (D,)}}}}

    return {"shared": {"embedding": (c.vocab_size, D)},
            "encoder": {"block": {str(i): block(i) for i in range(c.num_layers)},
                        "final_layer_norm": {"scale": (D,)}}}


@functools.lru_cache(maxsize=16)
def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """``[L, L]`` int32 bucket of ``key_pos - query_pos`` for bidirectional attention.

    transformers' ``T5Attention._relative_position_bucket`` with the same float32 operations (the log-spaced
    buckets' boundaries depend on float32 rounding), computed once per length on the host.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    nb = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * nb
    rel = np.abs(rel)
    max_exact = nb // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):  # log(0) on entries that is_small selects away
        large = np.log(rel.astype(np.float32) / np.float32(max_exact))
    large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(nb - max_exact)
    large = max_exact + np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def _block(c: T5EncoderConfig, p: Params, x: jax.Array, position_bias: jax.Array) -> jax.Array:
    sa = p["layer"]["0"]
    h = rms_norm(sa["layer_norm"], x, c.layer_norm_epsilon)
    a = sa["SelfAttention"]
    heads = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.d_kv)
    o = attention(heads(dense(a["q"], h)), heads(dense(a["k"], h)), heads(dense(a["v"], h)),
                  position_bias, scale=1.0)
    x = x + dense(a["o"], o.reshape(*o.shape[:2], -1))

    ffl = p["layer"]["1"]
    h = rms_norm(ffl["layer_norm"], x, c.layer_norm_epsilon)
    ff = ffl["DenseReluDense"]
    act = activation(c.dense_act_fn)
    if c.is_gated_act:
        h = act(dense(ff["wi_0"], h)) * dense(ff["wi_1"], h)
    else:
        h = act(dense(ff["wi"], h))
    return x + dense(ff["wo"], h)


def forward(config: T5EncoderConfig, params: Params, input_ids: jax.Array) -> jax.Array:
    """``T5EncoderModel(input_ids)[0]``: last hidden state ``[B, L, d_model]`` (no attention mask, like FluxPipeline).

    The computation dtype is the embedding's dtype. Ids must be in ``[0, vocab_size)``.
    """
    c = config
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"t5.forward: input_ids must be [B, L], got shape {tuple(ids.shape)}")
    L = ids.shape[1]
    blocks = params["encoder"]["block"]
    buckets = relative_position_buckets(L, c.relative_attention_num_buckets, c.relative_attention_max_distance)
    rel_bias = blocks["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]
    position_bias = embed(rel_bias, jnp.asarray(buckets)).transpose(2, 0, 1)[None]  # [1, H, L, L]
    x = embed(params["shared"], ids)
    for i in range(c.num_layers):
        x = _block(c, blocks[str(i)], x, position_bias)
    return rms_norm(params["encoder"]["final_layer_norm"], x, c.layer_norm_epsilon)


def init_params(config: T5EncoderConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std), unit RMSNorm scales): for benchmarks and demos."""
    return random_params(param_layout(config), key, dtype, std)
