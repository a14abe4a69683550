"""A small transformer text encoder for the shapes demo model (functional JAX: a config + a params pytree).

    cfg, params = load(folder)                         # config.json + model.safetensors (dotted keys)
    hidden, pooled = encode(params, ids, mask)        # [B, T, hidden_dim], [B, pooled_dim]

Architecture: token embedding + learned absolute positions, ``num_layers`` pre-LN transformer layers (bidirectional
self-attention in which padding tokens are never attended to, GELU MLP), a final LayerNorm (its output is
``encoder_hidden_states``, the FLUX ``joint_attention_dim`` input), then a masked mean over the real tokens and a
linear projection to ``pooled_dim`` (the FLUX ``pooled_projection_dim`` input).

Padding never reaches a real token or the pooled output: adding padding, or changing the ids at masked positions,
leaves ``pooled`` and the hidden states of the real tokens unchanged. ``encode`` reads every size from the params,
except the number of heads (``num_heads=``, default 2). Initialization and saving belong to training
(``examples/demo_training.py``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.io.safetensors import SafetensorsFile
from pqjax.models.common import is_shape

Params = dict[str, Any]

_NEG = -1e9  # finite, so a row with no real token stays finite (its pooled output is the bias)


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 64          # >= len(Tokenizer()) (the shapes vocabulary has ~30 words)
    hidden_dim: int = 64          # D_txt: FLUX joint_attention_dim (a multiple of 64)
    pooled_dim: int = 64          # D_pool: FLUX pooled_projection_dim (a multiple of 64)
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: int = 4
    max_positions: int = 32       # longest sequence encode() accepts

    def __post_init__(self):
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _dense(k_in, k_out):
    return {"kernel": (k_in, k_out), "bias": (k_out,)}


def _ln(d):
    return {"scale": (d,), "bias": (d,)}


def param_layout(c: TextEncoderConfig) -> Params:
    D, M = c.hidden_dim, c.mlp_ratio * c.hidden_dim
    layer = lambda: {"ln1": _ln(D), "qkv": _dense(D, 3 * D), "out": _dense(D, D),  # noqa: E731
                     "ln2": _ln(D), "fc1": _dense(D, M), "fc2": _dense(M, D)}
    return {"token_embedding": {"embedding": (c.vocab_size, D)},
            "position_embedding": {"embedding": (c.max_positions, D)},
            "layers": {str(i): layer() for i in range(c.num_layers)},
            "final_ln": _ln(D),
            "pooled_proj": _dense(D, c.pooled_dim)}


def _layer_norm(p, x, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense_apply(p, x):
    return x @ p["kernel"] + p["bias"]


def encode(params: Params, ids, mask, *, num_heads: int = TextEncoderConfig.num_heads) -> tuple[jax.Array, jax.Array]:
    """``(encoder_hidden_states [B, T, hidden_dim], pooled [B, pooled_dim])`` for ``ids`` int [B, T] and ``mask``
    bool [B, T] (True on real tokens, as ``Tokenizer.encode`` returns). Differentiable in ``params``."""
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, bool)
    B, T = ids.shape
    if T > params["position_embedding"]["embedding"].shape[0]:
        raise ValueError(f"text encoder: sequence length {T} > max_positions "
                         f"{params['position_embedding']['embedding'].shape[0]}")
    x = params["token_embedding"]["embedding"][ids] + params["position_embedding"]["embedding"][:T][None]
    D = x.shape[-1]
    hd = D // num_heads
    bias = jnp.where(mask, 0.0, _NEG)[:, None, None, :]  # keys: pads are never attended to
    for i in range(len(params["layers"])):
        p = params["layers"][str(i)]
        h = _layer_norm(p["ln1"], x)
        q, k, v = jnp.split(_dense_apply(p["qkv"], h), 3, axis=-1)
        q, k, v = (a.reshape(B, T, num_heads, hd) for a in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + bias
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(B, T, D)
        x = x + _dense_apply(p["out"], o)
        h = _layer_norm(p["ln2"], x)
        x = x + _dense_apply(p["fc2"], jax.nn.gelu(_dense_apply(p["fc1"], h), approximate=True))
    hidden = _layer_norm(params["final_ln"], x)
    m = mask.astype(hidden.dtype)[..., None]
    mean = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return hidden, _dense_apply(params["pooled_proj"], mean)


# ----------------------------------------------------------------------------------------------
# Load: safetensors (dotted keys) + config.json
# ----------------------------------------------------------------------------------------------

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def unflatten(flat: dict[str, Any]) -> Params:
    tree: Params = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def load(folder, dtype=jnp.float32) -> tuple[TextEncoderConfig, Params]:
    """``folder/config.json`` + ``folder/model.safetensors`` (dotted keys) -> ``(config, params)``."""
    folder = os.fspath(folder)
    with open(os.path.join(folder, CONFIG)) as f:
        config = TextEncoderConfig.from_dict(json.load(f))
    weights = SafetensorsFile(os.path.join(folder, WEIGHTS))
    params = unflatten({k: jnp.asarray(weights.read(k), dtype) for k in weights.keys()})
    want = jax.tree.map(lambda s: s, param_layout(config), is_leaf=is_shape)
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if jax.tree.structure(want, is_leaf=is_shape) != jax.tree.structure(got, is_leaf=is_shape) or \
            jax.tree.leaves(want, is_leaf=is_shape) != jax.tree.leaves(got, is_leaf=is_shape):
        raise ValueError(f"{folder}: text encoder weights do not match its config.json")
    return config, params
