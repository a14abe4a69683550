"""Pieces shared by the FLUX pipeline's other models (CLIP, T5, VAE): Hugging Face activation names, affine
LayerNorm, embedding lookup, and shape layouts (``is_shape``, random init from a layout).

The generic linear / norm / attention helpers live in :mod:`pqjax.models.layers` (its ``attention`` takes CLIP's
causal mask as ``is_causal``, T5's relative position bias as ``bias`` and T5's unscaled logits as ``scale=1.0``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.models.layers import layer_norm


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


#: ``transformers.activations.ACT2FN`` names -> JAX functions (the ones CLIP/T5 checkpoints use).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def affine_layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """``torch.nn.LayerNorm`` with weight (``scale``) and ``bias``; statistics in fp32."""
    y = layer_norm(x.astype(jnp.float32), eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def embed(p: dict, ids: jax.Array) -> jax.Array:
    """Embedding lookup (``nn.Embedding``); ids must be in range (checked by the callers on the host)."""
    return jnp.take(p["embedding"], ids, axis=0)


def is_shape(x) -> bool:
    """A leaf of a shape layout: a tuple of ints."""
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def random_params(layout: dict, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters for a shape layout: normal(0, std) everywhere except unit norm ``scale``s.

    For benchmarks and demos (tests randomize the torch reference instead and convert it). Drawn with numpy from a
    seed derived from ``key``: eager ``jax.random`` would compile a sampler per distinct shape (seconds per model).
    """
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(layout, is_leaf=is_shape)
    out = []
    for path, shape in flat:
        if path[-1].key == "scale":
            host = np.ones(shape, np.float32)
        else:
            host = std * rng.standard_normal(shape, np.float32)
        out.append(jax.device_put(host.astype(jnp.dtype(dtype))))
    return jax.tree.unflatten(treedef, out)
