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


def compile_ttir(mod: TritonModule, cc: int = 90, *, ttir_passes: bool = True):
    """Compile Triton IR text to PTX + cubin for ``sm_<cc>`` with the ``triton`` package.

    ``ttir_passes``: first run Triton's own TTIR pipeline (inline, canonicalize, combine - which folds
    ``acc + dot(a, b)`` into the MMA accumulator -, CSE, ...), as XLA's Triton pipeline does before
    TTGIR; ``triton.compile`` skips it for an IR file.  Returns the triton ``CompiledKernel``
    (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).
    """
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cc, 32)
    options = {"num_warps": mod.num_warps, "num_stages": mod.num_stages}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{mod.name}.ttir")
        with open(path, "w") as f:
            f.write(mod.ttir)
        if ttir_passes:
            from triton._C.libtriton import ir as tir
            from triton.compiler.compiler import make_backend

            backend = make_backend(target)
            ctx = tir.context()
            tir.load_dialects(ctx)
            backend.load_dialects(ctx)
            module = tir.parse_mlir_module(path, ctx)
            module.context = ctx
            backend.make_ttir(module, {}, backend.parse_options(options), cc)
            with open(path, "w") as f:
                f.write(str(module))
        return triton.compile(path, target=target, options=options)


# --------------------------------------------------------------------------------------------
# static budget: every kernel compiled for sm_90, its K loop counted (see pallas_kernels.budget)
# --------------------------------------------------------------------------------------------
def bf16_matmul(x, w_nk, *, block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3):
    """A plain bf16 Pallas Triton GEMM ``x[M, K] @ w_nk[N, K].T`` with the quantized kernels' tiling.

    The calibration point of the budget model: it must predict ~1.0 of bf16 peak.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    m, k = x.shape
    n = w_nk.shape[0]
    block_m = min(block_m, m)

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            return acc + lax.dot_general(x_ref[:, ks], w_ref[:, ks], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, k // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(m // block_m, n // block_n),
        in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), pl.BlockSpec((block_n, k), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages), name="bf16_gemm",
    )(x, w_nk)


@dataclasses.dataclass(frozen=True)
class KernelBudget:
    name: str
    kernel: str  # Triton module name
    loop: object  # budget.KLoop
    budget: object  # budget.Budget
    k_step: int  # K elements per loop iteration
    grid_large: int  # programs at the large M
    grid_small: int  # programs at the small M
    registers: int | None = None  # per thread (ptxas)
    spill_bytes: int | None = None  # spill stores (ptxas)


def ptxas_usage(ptx: str, cc: int = 90):
    """``(registers per thread, spill-store bytes)`` from ``ptxas -v`` (the triton package's ptxas), or Nones."""
    import re
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        exe = get_ptxas(cc).path
    except Exception:
        return None, None
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _abstract_operands(m, k, n, fmt, group):
    import jax
    import jax.numpy as jnp

    from pqjax.formats import quantize

    w = jax.eval_shape(lambda: quantize(jnp.zeros((k, n), jnp.float32), fmt, axis=0, group_size=group))
    return jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w, jax.ShapeDtypeStruct((), jnp.float32)


def kernel_catalog():
    """``[(name, make(m, k, n) -> (fn, args), k_step)]``: every GEMM kernel the model uses, plus bf16.

    W4A4 kernels take the packed activation (``quantize_activation``'s QTensor; the Hadamard rotation and the
    gather live in that pass, see :func:`act_quant_report`), W4A16 kernels a bf16 (or fp16) x.
    """
    import jax
    import jax.numpy as jnp

    import pallas_kernels as pk
    from pallas_kernels import reference

    def quantized(op, fmt, group, x_dtype=jnp.bfloat16):
        def make(m, k, n):
            x, w, gx = _abstract_operands(m, k, n, fmt, group)
            x = jax.ShapeDtypeStruct(x.shape, x_dtype)
            if op == "w4a16":
                def fn(x, w):
                    with pk.use_impl("triton"):
                        return pk.w4a16_matmul(x, w)

                return fn, (x, w)
            xq = jax.eval_shape(lambda x, g: reference.quantize_activation(
                x, fmt, global_scale=g if fmt == "nvfp4" else None, group_size=group), x, gx)

            def fn(xq, w):
                with pk.use_impl("triton"):
                    return pk.w4a4_matmul(xq, w)

            return fn, (xq, w)

        return make

    def bf16(m, k, n):
        return bf16_matmul, (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.bfloat16))

    return [
        ("bf16 Pallas GEMM (calibration)", bf16, 64),
        ("W4A4 nvfp4", quantized("w4a4", "nvfp4", None), 64),
        ("W4A16 nvfp4 (bf16 x)", quantized("w4a16", "nvfp4", None), 64),
        ("W4A16 nvfp4 (fp16 x)", quantized("w4a16", "nvfp4", None, jnp.float16), 64),
        ("W4A4 int4 g64", quantized("w4a4", "int4", 64), 64),
        ("W4A4 int4 g128", quantized("w4a4", "int4", 128), 128),
        ("W4A16 int4 g64", quantized("w4a16", "int4", 64), 64),
        ("W4A4 int3 g64", quantized("w4a4", "int3", 64), 64),
        ("W4A16 int3 g64", quantized("w4a16", "int3", 64), 64),
    ]


def _gemm_module(mods):
    """The module holding the MMA loop (a call may also launch small helper kernels)."""
    for mod in mods:
        if "tt.dot" in mod.ttir:
            return mod
    raise ValueError(f"no Triton module with a tt.dot among {[m.name for m in mods]}")


def _programs(mod) -> int:
    gx, gy, gz = mod.grid
    return gx * gy * gz


def kernel_budget(name, make, k_step, *, m=4608, k=3072, n=3072, m_small=64, cc=90) -> KernelBudget:
    from . import budget

    fn, args = make(m, k, n)
    mod = _gemm_module(triton_modules(lower_for_cuda(fn, *args)))
    kern = compile_ttir(mod, cc)
    loop = budget.k_loop(kern.asm["ptx"])
    fn_s, args_s = make(m_small, k, n)
    small = _gemm_module(triton_modules(lower_for_cuda(fn_s, *args_s)))
    useful = m * n * k_step // _programs(mod)  # one program's tile x one K step (no split-K at large M)
    regs, spill = ptxas_usage(kern.asm["ptx"], cc)
    return KernelBudget(name, mod.name, loop, budget.predict(loop, mod.num_warps, useful_macs=useful), k_step,
                        _programs(mod), _programs(small), regs, spill)


def budget_report(*, m=4608, k=3072, n=3072, m_small=64, cc=90, only=None) -> list[KernelBudget]:
    """Print the budget table of every kernel in :func:`kernel_catalog`; returns the rows."""
    rows = []
    hdr = (f"{'kernel':<30} {'instr/thread/step':>17} {'(mov)':>5} {'K step':>6} {'MMA per step':<27} "
           f"{'MMA cyc':>7} {'issue cyc':>9} {'pred. x bf16':>12} {f'grid M={m}':>11} {f'grid M={m_small}':>10} "
           f"{'regs':>4} {'spill':>5}")
    print(f"static budget, sm_{cc}, M={m} K={k} N={n} (H100 model: 4 warp-instr/cycle/SM, 2048 bf16 / "
          f"4096 int8 MACs/cycle/SM)")
    print(hdr)
    for name, make, k_step in kernel_catalog():
        if only and not any(o in name for o in only):
            continue
        r = kernel_budget(name, make, k_step, m=m, k=k, n=n, m_small=m_small, cc=cc)
        b = r.budget
        print(f"{name:<30} {b.instructions:>17} {r.loop.moves:>5} {k_step:>6} {r.loop.mma_summary():<27} "
              f"{b.mma_cycles:>7.0f} {b.issue_cycles:>9.0f} {b.fraction_of_bf16_peak:>12.2f} {r.grid_large:>11} "
              f"{r.grid_small:>10} {r.registers or '?':>4} {r.spill_bytes if r.spill_bytes is not None else '?':>5}",
              flush=True)
        rows.append(r)
    return rows


# FLUX.1 linear sites that read one quantized activation: (site, K, total N of its consumers)
FLUX_ACT_SITES = (
    ("P1 (to_q/k/v)", 3072, 3 * 3072),
    ("P3 (ff.net.0.proj)", 3072, 12288),
    ("P4 (ff.net.2)", 12288, 3072),
    ("P2 (to_out.0)", 3072, 3072),
    ("single P1 (q/k/v + proj_mlp)", 3072, 3 * 3072 + 12288),
    ("single OUT (proj_out)", 15360, 3072),
)


def act_quant_report(*, m=4608, cc=90, variants=(("nvfp4", None, False, False), ("nvfp4", None, True, True),
                                                 ("int4", 64, False, False))):
    """Bandwidth model of the activation-quantize pass vs the MMA time of the GEMMs it feeds, per FLUX site.

    Bytes: x read once (bf16) + packed codes + scales written.  Also the compiled kernel's PTX instructions per
    element and the issue time they imply (all SMs, the clock implied by the bf16 peak), to show whether the pass
    is bandwidth-bound as modeled.
    """
    import jax
    import jax.numpy as jnp

    import pallas_kernels as pk

    from . import budget

    peak = budget.H100
    clock = peak.bf16_flops / (2 * peak.rate("bf16") * peak.sms)
    print(f"\nactivation-quantize pass (M={m}, bf16 x; {peak.bytes_per_second / 1e12:.2f} TB/s, bf16 peak "
          f"{peak.bf16_flops / 1e12:.0f} TFLOP/s)")
    print(f"{'format':<16} {'site':<30} {'K':>6} {'N fed':>6} {'MB moved':>9} {'t_bw us':>8} {'t_mma us':>9} "
          f"{'bw/mma':>7} {'instr/elem':>10} {'t_issue us':>10}")
    for fmt, group, perm, had in variants:
        for site, k, n in FLUX_ACT_SITES:
            x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
            args = (x, jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((k,), jnp.int32))

            def fn(x, gs, pp):
                with pk.use_impl("triton"):
                    q = pk.quantize_activation(x, fmt, global_scale=gs if fmt == "nvfp4" else None,
                                               perm=pp if perm else None, hadamard=had, group_size=group)
                return q.codes, q.scales

            (mod,) = triton_modules(lower_for_cuda(fn, *args))
            ptx = compile_ttir(mod, cc).asm["ptx"]
            instr = sum(budget._statements(line) for line in ptx.splitlines())  # no loop: one tile per program
            threads = mod.num_warps * 32
            elems = m * k / _programs(mod) / threads
            t_issue = instr * mod.num_warps * _programs(mod) / (peak.issue_per_cycle * peak.sms * clock)
            g = 16 if fmt == "nvfp4" else group
            nbytes = m * k * 2 + m * k // 2 + m * (k // g) * (1 if fmt == "nvfp4" else 2)
            t_bw = budget.bandwidth_seconds(nbytes)
            t_mma = 2.0 * m * k * n / peak.bf16_flops
            tag = fmt + (f" g{group}" if group else "") + (" perm" if perm else "") + (" had" if had else "")
            print(f"{tag:<16} {site:<30} {k:>6} {n:>6} {nbytes / 1e6:>9.1f} {t_bw * 1e6:>8.1f} {t_mma * 1e6:>9.1f} "
                  f"{t_bw / t_mma:>7.3f} {instr / elems:>10.1f} {t_issue * 1e6:>10.1f}", flush=True)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Check the GPU path without a GPU.")
    p.add_argument("--budget", action="store_true", help="static issue-vs-MMA budget of every kernel (sm_90)")
    p.add_argument("--m", type=int, default=4608)
    p.add_argument("--k", type=int, default=3072)
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--m-small", type=int, default=64)
    p.add_argument("--cc", type=int, default=90)
    p.add_argument("--only", nargs="*", help="substrings of kernel names to include")
    args = p.parse_args(argv)
    if not args.budget:
        p.print_help()
        return 0
    if not have_triton():
        print("the `triton` package is needed to compile for sm_90 on this host: pip install triton")
        return 1
    budget_report(m=args.m, k=args.k, n=args.n, m_small=args.m_small, cc=args.cc, only=args.only)
    act_quant_report(m=args.m, cc=args.cc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
