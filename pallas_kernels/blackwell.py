"""Blackwell (compute capability >= 10.0): NVFP4 W4A4 through native block-scaled FP4 tensor cores.

``jax.nn.scaled_matmul`` with float4_e2m1fn operands and float8_e4m3fn scales per 16 (cuDNN's block-scaled
GEMM, XLA custom call ``__op$block_scaled_dot``) computes ``sum_k (qx * sx) * (qw * sw)`` with fp32
accumulation: exactly the reference's exact operand values, so the result equals
:func:`pallas_kernels.reference.w4a4_matmul_packed` up to accumulation order.  The packed codes are
reinterpreted, not decoded: uint8 nibbles -> uint4 -> bitcast to float4_e2m1fn (same bits).

The dispatcher uses this on ``impl="cudnn"``, which the automatic choice picks on sm_100 / sm_120; Hopper
and Ampere have no FP4 tensor cores and keep the Triton kernels.  It cannot run on this project's CI
(no Blackwell): ``tests/test_gemm.py`` checks that it lowers for CUDA to the block-scaled dot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pqjax.formats import unpack_4bit

from ._common import check_packed_args

__all__ = ["w4a4_scaled_matmul"]


def _f4(codes_packed, rows: int):
    c = unpack_4bit(codes_packed.reshape(rows, -1))  # uint8 nibbles [rows, K]
    return lax.bitcast_convert_type(c.astype(jnp.uint4), jnp.float4_e2m1fn)


def w4a4_scaled_matmul(xq, w, *, bias=None, out_dtype=None, interpret=False):
    """Packed nvfp4 ``xq [..., K] @ w [K, N]`` via ``jax.nn.scaled_matmul``; same contract as the Triton kernel."""
    del interpret  # no kernel of our own here
    p = check_packed_args(xq, w, bias, out_dtype, who="w4a4_matmul")
    if p.fmt != "nvfp4":
        raise NotImplementedError("jax.nn.scaled_matmul serves nvfp4 only")
    a = _f4(xq.codes, p.m)[None]
    b = _f4(w.codes, p.n)[None]
    sa = xq.scales.reshape(p.m, p.k // 16)[None]
    sb = w.scales[None]
    acc = jax.nn.scaled_matmul(a, b, sa, sb, preferred_element_type=jnp.float32)[0]
    acc = acc * (jnp.asarray(xq.global_scale, jnp.float32) * jnp.asarray(w.global_scale, jnp.float32))
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(p.out_dtype).reshape(*p.lead, p.n)
