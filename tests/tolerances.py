"""Error bounds for comparing two implementations of one fp32 computation, derived from the arithmetic.

Two correct implementations (diffusers/torch vs JAX/XLA, one CPU's BLAS vs another's) differ only in the order in
which they round. With u = 2^-24 (fp32 unit roundoff), a reduction of length k (a dot product, a sum, a softmax
denominator) has a rounding error of about sqrt(k) * u relative to its terms when the errors are independent
(Higham, "Accuracy and Stability of Numerical Algorithms", section 2.8; the worst case is k * u). A network that
chains ``depth`` reductions accumulates their relative errors, to first order, additively. So the maximum
difference between two fp32 runs, relative to the reference's maximum magnitude, is bounded by

    fp32_bound(k, depth) = C * depth * sqrt(k) * u,      C = 8

with k the longest reduction on the path and C covering the maximum over every element of the output (a
6-sigma tail over ~10^5 elements is about 5 sigma; twice that for two implementations would be 10: 8 with the
first-order sum, which already overestimates). The bounds stay far below what a real bug produces: one bf16 rounding
anywhere costs ~4e-3 (2^-8), a wrong or missing weight ~1.
"""
from __future__ import annotations

import math

U32 = 2.0 ** -24  # fp32 unit roundoff
C = 8.0


def fp32_bound(k: int, depth: int = 1) -> float:
    """Max |a - b| / max |b| for two fp32 evaluations of ``depth`` chained reductions of length <= ``k``."""
    return C * depth * math.sqrt(k) * U32


def flux_depth(num_layers: int, num_single_layers: int) -> int:
    """Chained reductions on FLUX's longest path (see models/flux.py).

    Embedders and time/text MLP + modulation linear: 4; per double block: LayerNorm, Q/K/V linear, RMSNorm, QK^T,
    softmax sum, PV, output linear, LayerNorm, FF in, FF out = 10; per single block: LayerNorm, Q/K/V/MLP linear,
    RMSNorm, QK^T, softmax, PV, proj_out = 7; output LayerNorm + proj_out: 2.
    """
    return 4 + 10 * num_layers + 7 * num_single_layers + 2


def flux_k(inner_dim: int, seq_len: int) -> int:
    """Longest reduction in FLUX: the single blocks' proj_out reads attention + MLP (inner + 4 * inner), or the
    attention's sum over the sequence if that is longer."""
    return max(5 * inner_dim, seq_len)


def text_encoder_depth(num_layers: int) -> int:
    """CLIP / T5 encoder layer: norm, Q/K/V, QK^T, softmax, PV, output, norm, FF in, FF out (+ one spare for T5's
    gated product and the position bias) = 10; plus the final norm."""
    return 10 * num_layers + 1


def vae_depth(num_blocks: int, layers_per_block: int) -> int:
    """AutoencoderKL decoder (the deeper half): conv_in, mid block (2 ResNets of norm+conv+norm+conv, attention of
    norm, QKV, QK^T, softmax, PV, out), per up block (layers_per_block + 1) ResNets + an upsampling conv, norm_out,
    conv_out. Group-norm statistics are pairwise sums (error ~ log2(n) u, far below sqrt(n) u): one reduction each."""
    return 1 + 14 + num_blocks * (4 * (layers_per_block + 1) + 1) + 2


def png_levels(float_bound: float) -> int:
    """8-bit image levels two renderings may differ by when their float images ([0, 1]) differ by <= float_bound:
    rounding to 1/255 steps turns any difference below one step into at most one level."""
    return int(math.floor(float_bound * 255)) + 1
