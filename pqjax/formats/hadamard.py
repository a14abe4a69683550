"""The block-diagonal Hadamard rotation of PermuQuant-H and the rotation baselines (ConvRot-style).

One convention everywhere (the search, the offline weight rotation, the kernels' online activation rotation):
``H_g`` is the +-1 Sylvester matrix of order ``g`` (symmetric, ``H_g @ H_g = g I``) and a rotation applies
``H_g / sqrt(g)`` to each contiguous group of ``g`` channels, so it is orthogonal and its own inverse. The
normalization is one fp32 multiply after the exact +-1 sums, which is what the kernels compute.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["hadamard_matrix", "block_hadamard"]


def hadamard_matrix(n: int, dtype=np.float32) -> np.ndarray:
    """The UNNORMALIZED Sylvester Hadamard matrix ``H_n`` (entries +-1, symmetric, ``H @ H = n I``)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of 2, got {n}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h.astype(dtype)


def block_hadamard(x: jax.Array, group: int, axis: int = -1) -> jax.Array:
    """Rotate ``x`` along ``axis`` by ``blockdiag(H_g / sqrt(g))`` with ``g = group``; fp32 arithmetic, the
    result in ``x``'s dtype. Applied to activations along K and to Flax kernels ``[K, N]`` with ``axis=0``, it
    leaves ``x @ W`` unchanged."""
    x = jnp.asarray(x)
    xm = jnp.moveaxis(x, axis, -1)
    k = xm.shape[-1]
    if k % group:
        raise ValueError(f"block Hadamard: axis of length {k} is not a multiple of the group {group}")
    h = jnp.asarray(hadamard_matrix(group))
    y = jnp.einsum("...gi,ij->...gj", xm.reshape(*xm.shape[:-1], k // group, group).astype(jnp.float32), h,
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    y = y * jnp.float32(1.0 / float(group) ** 0.5)
    return jnp.moveaxis(y.reshape(xm.shape).astype(x.dtype), -1, axis)
