"""Check the GPU path without a GPU: lower for CUDA, pull out the Triton IR, compile it to cubin.

``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`` works on a CPU-only jaxlib: it
runs the real Pallas -> Triton lowering (without a GPU it assumes compute capability 9.0) and
emits a ``__gpu$xla.gpu.triton`` custom call whose backend config carries the Triton module as
MLIR bytecode.  :func:`triton_modules` extracts those modules as Triton IR text, and
:func:`compile_ttir` compiles one with the ``triton`` pip package (optional; it runs on a CPU
host) to PTX and cubin for a given ``sm_XX``, i.e. everything XLA's GPU backend would do with it
short of loading it on a device.

Tooling only (private ``jax._src`` imports, guarded); the kernels do not depend on it.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

__all__ = ["TritonModule", "lower_for_cuda", "triton_modules", "compile_ttir", "have_triton"]

_TRITON_TARGET = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonModule:
    name: str
    ttir: str  # Triton IR (MLIR text)
    num_warps: int
    num_stages: int
    grid: tuple


def lower_for_cuda(fn, *args):
    """``jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))``."""
    import jax

    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _walk(op, out):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                if child.operation.name == "stablehlo.custom_call":
                    out.append(child.operation)
                _walk(child.operation, out)


def triton_modules(lowered) -> list[TritonModule]:
    """The Triton kernels inside a CUDA-lowered computation, as Triton IR text."""
    from jax._src.lib import triton as jax_triton
    from jax._src.lib.mlir import ir

    calls: list = []
    _walk(lowered.compiler_ir("stablehlo").operation, calls)
    mods = []
    for op in calls:
        if ir.StringAttr(op.attributes["call_target_name"]).value != _TRITON_TARGET:
            continue
        cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
        data = ir.StringAttr(cfg["ir"]).value_bytes
        ctx = ir.Context()
        jax_triton.dialect.register_dialect(ctx)
        with ctx:
            text = ir.Module.parse(data).operation.get_asm(enable_debug_info=False)

        def i32(key):
            return ir.IntegerAttr(cfg[key]).value

        mods.append(TritonModule(ir.StringAttr(cfg["name"]).value, text, i32("num_warps"),
                                 i32("num_stages"), (i32("grid_x"), i32("grid_y"), i32("grid_z"))))
    return mods


def have_triton() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception:
        return False
    return True


def compile_ttir(mod: TritonModule, cc: int = 90):
    """Compile Triton IR text to PTX + cubin for ``sm_<cc>`` with the ``triton`` package.

    Returns the triton ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).
    """
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{mod.name}.ttir")
        with open(path, "w") as f:
            f.write(mod.ttir)
        return triton.compile(path, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": mod.num_warps, "num_stages": mod.num_stages})
