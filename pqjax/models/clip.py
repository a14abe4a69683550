"""CLIP text encoder (transformers' ``CLIPTextModel``) as pure JAX functions: FLUX's ``text_encoder/``.

FluxPipeline uses only its pooled output (the final-LayerNorm state at the end-of-text token) as
``pooled_projections``. Parameters are nested dicts keyed by transformers' module names (without the
``text_model.`` prefix older checkpoints carry), e.g. ``params["encoder"]["layers"]["0"]["self_attn"]["q_proj"]``;
Linear ``{"kernel": [in, out], "bias"}``, LayerNorm ``{"scale", "bias"}``, Embedding ``{"embedding": [V, D]}``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from pqjax.models.common import (ACTIVATIONS, activation, affine_layer_norm, embed,
                                 random_params)
from pqjax.models.layers import attention, dense

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The ``CLIPTextConfig`` fields the text model uses (defaults: CLIP ViT-L/14's text tower, FLUX's encoder)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    #: 2 is the legacy value of openai/clip-vit-large-patch14 (and FLUX): pool at argmax(input_ids) instead.
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: unsupported hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a ``config.json`` dict (a ``CLIPConfig``'s ``text_config`` is used if present).

        Missing keys take transformers' ``CLIPTextConfig`` defaults (which differ from CLIP-L's)."""
        d = dict(d.get("text_config") or d)
        hf_defaults = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, eos_token_id=49407)
        return cls(**{k: v if d.get(k) is None else d[k] for k, v in hf_defaults.items()})


def _linear(k_in: int, k_out: int) -> dict[str, tuple[int, ...]]:
    return {"kernel": (k_in, k_out), "bias": (k_out,)}


def _norm(d: int) -> dict[str, tuple[int, ...]]:
    return {"scale": (d,), "bias": (d,)}


def param_layout(config: CLIPTextConfig) -> Params:
    """Nested dict of parameter shapes (tuples), keyed like ``CLIPTextModel``'s state dict."""
    c, D = config, config.hidden_size
    layer = lambda: {
        "self_attn": {n: _linear(D, D) for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm1": _norm(D),
        "mlp": {"fc1": _linear(D, c.intermediate_size), "fc2": _linear(c.intermediate_size, D)},
        "layer_norm2": _norm(D),
    }
    return {
        "embeddings": {"token_embedding": {"embedding": (c.vocab_size, D)},
                       "position_embedding": {"embedding": (c.max_position_embeddings, D)}},
        "encoder": {"layers": {str(i): layer() for i in range(c.num_hidden_layers)}},
        "final_layer_norm": _norm(D),
    }


def _layer(c: CLIPTextConfig, p: Params, x: jax.Array) -> jax.Array:
    h = affine_layer_norm(p["layer_norm1"], x, c.layer_norm_eps)
    a = p["self_attn"]
    heads = lambda t: t.reshape(*t.shape[:-1], c.num_attention_heads, c.head_dim)
    o = attention(heads(dense(a["q_proj"], h)), heads(dense(a["k_proj"], h)), heads(dense(a["v_proj"], h)),
                  is_causal=True)
    x = x + dense(a["out_proj"], o.reshape(*o.shape[:2], -1))
    h = affine_layer_norm(p["layer_norm2"], x, c.layer_norm_eps)
    h = dense(p["mlp"]["fc2"], activation(c.hidden_act)(dense(p["mlp"]["fc1"], h)))
    return x + h


def forward(config: CLIPTextConfig, params: Params, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``CLIPTextModel(input_ids)`` -> ``(last_hidden_state [B, L, D], pooler_output [B, D])``.

    Causal self-attention, no padding mask (FluxPipeline passes none). The pooled state is taken at the first
    ``eos_token_id`` of each row, or at ``argmax(input_ids)`` for the legacy ``eos_token_id == 2`` (as transformers
    does). The computation dtype is the token embedding's dtype. Ids must be in ``[0, vocab_size)``.
    """
    c = config
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"clip.forward: input_ids must be [B, L], got shape {tuple(ids.shape)}")
    L = ids.shape[1]
    if L > c.max_position_embeddings:
        raise ValueError(f"clip.forward: sequence length {L} exceeds max_position_embeddings={c.max_position_embeddings}")
    emb = params["embeddings"]
    x = embed(emb["token_embedding"], ids) + emb["position_embedding"]["embedding"][:L][None]
    for i in range(c.num_hidden_layers):
        x = _layer(c, params["encoder"]["layers"][str(i)], x)
    x = affine_layer_norm(params["final_layer_norm"], x, c.layer_norm_eps)
    if c.eos_token_id == 2:
        pos = jnp.argmax(ids, axis=-1)
    else:
        pos = jnp.argmax((ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    return x, pooled


def pooled_output(config: CLIPTextConfig, params: Params, input_ids: jax.Array) -> jax.Array:
    """What FluxPipeline uses: ``CLIPTextModel(input_ids).pooler_output`` ``[B, hidden_size]``."""
    return forward(config, params, input_ids)[1]


def init_params(config: CLIPTextConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std), unit LayerNorm scales): for benchmarks and demos."""
    return random_params(param_layout(config), key, dtype, std)
