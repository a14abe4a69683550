"""Synthetic FLUX weights whose activations look like a real DiT's (for tests, the demo and quality tables).

No real FLUX weights can be downloaded here, and a model with i.i.d. Gaussian weights has flat channel statistics:
every channel order is as good as any other, so it cannot show what channel reordering does. Published analyses of
FLUX/SD3 activations (summarized in the PermuQuant paper, arXiv 2605.09503) report:

1. a few residual-stream channels carry *massive activations*, far larger than the rest, on all image tokens;
2. milder per-channel outliers everywhere (log-normal-like channel scales);
3. after LayerNorm the adaLN ``(1 + scale)`` and ``shift`` rows set per-channel scales, so post-norm activations
   inherit strongly non-uniform channel magnitudes, modulated by the timestep embedding;
4. weights are Gaussian-like with long tails.

:func:`outlier_params` builds exactly that on top of :func:`pqjax.models.flux.init_params`:
(1) ``x_embedder`` / ``context_embedder`` output columns of ``n_massive`` channels scaled by ``massive`` (and the
single-stream blocks keep them through the residual); (2) every linear's output columns get log-normal scales
exp(N(0, ``sigma_ch``)) (per-channel outliers in every activation it produces, incl. the GELU hidden and the
attention values); (3) the adaLN biases of the ``scale`` chunks are exp(N(0, ``sigma_mod``)) - 1 and of the ``shift``
chunks N(0, 0.5) per channel, with the modulation kernel making them depend on the timestep; (4) weights are
Student-t (3 dof) scaled to fan-in variance, with per-input-channel log-normal scales exp(N(0, ``sigma_w``)).
The output stays finite and O(1) (unit-ish residual gates), so a sampler run is meaningful.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import sites as S
from pqjax.models.flux import FluxConfig, param_layout


def outlier_params(config: FluxConfig, seed: int = 0, *, n_massive: int = 3, massive: float = 30.0,
                   sigma_ch: float = 0.8, sigma_mod: float = 0.9, sigma_w: float = 0.5, gate: float = 0.3,
                   dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)
    layout = param_layout(config)
    D = config.inner_dim
    params = jax.tree.map(lambda s: np.zeros(s, np.float32), layout,
                          is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    massive_ch = rng.choice(D, n_massive, replace=False)
    mods = set(S.modulation_linears(config)) | {"norm_out.linear"}
    for path in S.linear_paths(params):
        lin = S.get_path(params, path)
        k_in, k_out = lin["kernel"].shape
        w = rng.standard_t(3, (k_in, k_out)) / np.sqrt(3.0) / np.sqrt(k_in)
        w *= np.exp(sigma_w * rng.standard_normal(k_in))[:, None]
        col = np.exp(sigma_ch * rng.standard_normal(k_out))
        b = 0.1 * rng.standard_normal(k_out)
        if path in mods:
            n_chunks = k_out // D
            w *= 0.3  # timestep-dependent modulation, but dominated by the per-channel bias
            col = np.ones(k_out)
            names = {6: ("shift", "scale", "gate") * 2, 3: ("shift", "scale", "gate"), 2: ("scale", "shift")}[n_chunks]
            for c, name in enumerate(names):
                sl = slice(c * D, (c + 1) * D)
                if name == "scale":
                    b[sl] = np.exp(sigma_mod * rng.standard_normal(D)) - 1.0
                elif name == "shift":
                    b[sl] = 0.5 * rng.standard_normal(D)
                else:
                    b[sl] = gate * (1 + 0.2 * rng.standard_normal(D))
                    w[:, sl] *= 0.1
        if path in ("x_embedder", "context_embedder"):
            col[massive_ch] = massive
        if path == "proj_out":
            col = np.ones(k_out)
        lin["kernel"][...] = w * col[None]
        if "bias" in lin:
            lin["bias"][...] = b * (col if path not in mods else 1.0)
    for blk in list(params["transformer_blocks"].values()) + list(params["single_transformer_blocks"].values()):
        for name, norm in blk["attn"].items():
            if name.startswith("norm"):
                norm["scale"][...] = np.exp(0.3 * rng.standard_normal(norm["scale"].shape))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
