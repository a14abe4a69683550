"""Quantized linears for pqjax: Pallas GPU kernels (Triton backend) + their pure-XLA references.

The model calls::

    xq = pallas_kernels.quantize_activation(x, "nvfp4", global_scale=gx, perm=p)   # once per site
    y = pallas_kernels.w4a4_matmul(xq, w, bias=b)                                 # W4A4, per linear reading x
    y = pallas_kernels.w4a4_matmul(x, w, bias=b, act_global_scale=gx)             # W4A4 on a float x (both steps)
    y = pallas_kernels.w4a16_matmul(x, w, bias=b)                                 # weight-only

``w`` is a Flax kernel ``[K, N]`` quantized with ``pqjax.formats.quantize(W, fmt, axis=0)``;
``x[..., K]``; the result ``[..., N]`` is in ``out_dtype`` (default ``x.dtype``).  Numerics:
:mod:`pallas_kernels.reference` (activation codes bit-identical; GEMMs equal up to fp32 accumulation order).
The static sm_90 budget of every kernel: ``python -m pallas_kernels.gpu_check --budget``.

``hadamard=True`` (PermuQuant-H) rotates x per quantization group (16 for nvfp4) by the
normalized Sylvester Hadamard matrix ``H_g / sqrt(g)`` (:func:`hadamard_matrix` gives the +-1
``H_g``; symmetric and orthogonal once normalized) before quantizing it; the weight must already
have been rotated offline with the same matrix: ``W_rot[group rows] = (H_g / sqrt(g)) @ W[group
rows]``, so that ``x_rot @ W_rot == x @ W``.

Implementation choice (made at TRACE time):

* ``impl=None`` / no :func:`use_impl`: ``"cudnn"`` on an NVIDIA GPU with compute capability >= 10.0
  (Blackwell), the Triton kernels on compute capability >= 8.0, the XLA reference elsewhere (CPU, TPU,
  ROCm, older GPUs).  The kernels decode e4m3 and round e2m1/e4m3 by hand, so sm_80 needs no special flag.
* ``impl`` / ``use_impl(...)``: ``"xla"`` (reference), ``"triton"`` (the kernel, compiled for
  the GPU), ``"interpret"`` (the kernel through the Pallas interpreter: CPU tests), ``"cudnn"``
  (NVFP4 W4A4 through ``jax.nn.scaled_matmul``, native block-scaled FP4 on Blackwell,
  :mod:`pallas_kernels.blackwell`; every other op uses its Triton kernel).  An explicit
  ``impl=`` argument wins over the context manager.  ``use_impl`` is a JAX config state that is
  part of the jit cache key, so a function jitted under one choice is retraced under another;
  the environment variable ``PQJAX_KERNEL_IMPL`` sets the default.
* If the kernel cannot serve a shape it raises ``NotImplementedError``; the dispatcher then uses
  the reference and logs that once per reason at DEBUG level.
"""
from __future__ import annotations

import contextlib
import logging
import threading

import jax

from . import act_quant
from . import blackwell
from . import reference
from ._common import check_args, hadamard_matrix
from . import triton_kernels

__all__ = ["quantize_activation", "w4a4_matmul", "w4a16_matmul", "use_impl", "current_impl", "resolve_impl",
           "IMPLS", "hadamard_matrix", "reference", "triton_kernels", "act_quant", "blackwell"]

IMPLS = ("xla", "triton", "interpret", "cudnn")
_log = logging.getLogger(__name__)
_logged: set = set()


def _make_state():
    """A JAX config state included in the jit cache key (private API; thread-local fallback)."""
    try:
        from jax._src import config as jax_config

        return jax_config.optional_enum_state(
            "pqjax_kernel_impl", IMPLS, None,
            help="pqjax quantized-linear implementation: xla, triton, interpret, cudnn or None (auto).",
            include_in_jit_key=True, include_in_trace_context=True)
    except Exception:  # pragma: no cover - a JAX without this API, or a module reload
        return None


_IMPL_STATE = _make_state()
_local = threading.local()


def _check_impl(impl):
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {IMPLS} or None")
    return impl


@contextlib.contextmanager
def use_impl(impl):
    """Force the implementation for calls traced inside the block: "xla", "triton", "interpret", "cudnn" or None."""
    _check_impl(impl)
    if _IMPL_STATE is not None:
        with _IMPL_STATE(impl):
            yield
        return
    prev = getattr(_local, "impl", None)
    _local.impl = impl
    try:
        yield
    finally:
        _local.impl = prev


def current_impl():
    """The implementation forced by the innermost :func:`use_impl` (None: automatic)."""
    if _IMPL_STATE is not None:
        return _IMPL_STATE.value
    return getattr(_local, "impl", None)


def _gpu_compute_capability():
    """(major, minor) of the default backend's first device if it is an NVIDIA GPU, else None."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    if dev.platform != "gpu":
        return None
    cc = getattr(dev, "compute_capability", None)
    if cc is None:  # ROCm devices have no compute_capability
        return None
    try:
        major, minor = (int(v) for v in str(cc).split(".")[:2])
    except ValueError:
        return None
    return major, minor


def resolve_impl(impl=None) -> str:
    """The implementation a call would use now: explicit ``impl``, else :func:`use_impl`, else auto."""
    impl = _check_impl(impl) or current_impl()
    if impl is not None:
        return impl
    cc = _gpu_compute_capability()
    if cc is not None and cc >= (10, 0):
        return "cudnn"
    return "triton" if cc is not None and cc >= (8, 0) else "xla"


def _fallback_once(name, err):
    key = (name, str(err))
    if key not in _logged:
        _logged.add(key)
        _log.debug("pallas_kernels.%s: kernel cannot serve this call (%s); using the XLA reference", name, err)


def _dispatch(name, kernel, ref, impl, kwargs, x, w):
    impl = resolve_impl(impl)
    if impl == "xla":
        return ref(x, w, **kwargs)
    try:
        return kernel(x, w, interpret=impl == "interpret", **kwargs)
    except NotImplementedError as err:
        _fallback_once(name, err)
        return ref(x, w, **kwargs)


def w4a4_matmul(x, w, *, bias=None, act_global_scale=None, hadamard=False, out_dtype=None, impl=None):
    """W4A4 linear ``x @ W + bias``.

    ``x`` is either the packed activation from :func:`quantize_activation` (a QTensor: the packed x packed
    GEMM, nothing re-quantized; share one ``xq`` between every linear that reads the same activation) or a
    float array, which is first quantized like ``w`` (nvfp4: static ``act_global_scale``; ``hadamard``).
    """
    from pqjax.formats import QTensor

    if isinstance(x, QTensor):
        if act_global_scale is not None or hadamard:
            raise ValueError("w4a4_matmul: act_global_scale / hadamard belong to quantize_activation; the packed "
                             f"xq of shape {x.shape} already carries them")
        kwargs = dict(bias=bias, out_dtype=out_dtype)
        kernel = triton_kernels.w4a4_packed
        if resolve_impl(impl) == "cudnn" and x.fmt == "nvfp4":
            kernel = blackwell.w4a4_scaled_matmul
        return _dispatch("w4a4_matmul", kernel, reference.w4a4_matmul_packed, impl, kwargs, x, w)
    if resolve_impl(impl) == "cudnn" and getattr(w, "fmt", None) == "nvfp4":  # Blackwell: quantize, then FP4 MMA
        check_args(x, w, bias, out_dtype, who="w4a4_matmul", act_global_scale=act_global_scale,
                             need_act_scale=True)
        xq = quantize_activation(x, "nvfp4", global_scale=act_global_scale, hadamard=hadamard, impl=impl)
        return w4a4_matmul(xq, w, bias=bias, out_dtype=x.dtype if out_dtype is None else out_dtype, impl=impl)
    kwargs = dict(bias=bias, act_global_scale=act_global_scale, hadamard=hadamard, out_dtype=out_dtype)
    return _dispatch("w4a4_matmul", triton_kernels.w4a4_matmul, reference.w4a4_matmul, impl, kwargs, x, w)


def w4a16_matmul(x, w, *, bias=None, out_dtype=None, impl=None):
    """Weight-only linear ``x @ dequant(W) + bias`` (fp32 accumulation)."""
    kwargs = dict(bias=bias, out_dtype=out_dtype)
    return _dispatch("w4a16_matmul", triton_kernels.w4a16_matmul, reference.w4a16_matmul, impl, kwargs, x, w)


def quantize_activation(x, fmt, *, global_scale=None, perm=None, hadamard=False, smooth=None, group_size=None,
                        scale_dtype=None, impl=None):
    """Quantize an activation ONCE for every linear that reads it -> packed :class:`pqjax.formats.QTensor`.

    One pass over ``x[..., K]``: read in the site's channel order ``perm`` (the gather is fused), smooth
    (``(x * smooth).astype(x.dtype)``), rotate per group (``hadamard``), quantize to ``fmt`` (nvfp4 with the
    static ``global_scale``; int4/int3 per token per ``group_size`` with ``scale_dtype`` scales) and pack.
    The result has x's logical shape, quantized along the last axis (codes ``[..., K/2]``, scales
    ``[..., K/group]``, like a weight's storage) and feeds :func:`w4a4_matmul`.  Bit-identical to
    :func:`pallas_kernels.reference.quantize_activation` (= ``pqjax.formats`` on the transformed x).
    """
    kwargs = dict(global_scale=global_scale, perm=perm, hadamard=hadamard, smooth=smooth, group_size=group_size,
                  scale_dtype=scale_dtype)
    impl = resolve_impl(impl)
    if impl == "xla":
        return reference.quantize_activation(x, fmt, **kwargs)
    try:
        return act_quant.quantize_activation(x, fmt, interpret=impl == "interpret", **kwargs)
    except NotImplementedError as err:
        _fallback_once("quantize_activation", err)
        return reference.quantize_activation(x, fmt, **kwargs)
