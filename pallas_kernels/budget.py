"""Static issue-vs-tensor-core budget of a compiled kernel's K loop (no GPU needed).

The model (H100/H200 figures, per SM): 4 warp schedulers each issue one warp-instruction per cycle;
the tensor cores retire ~2,048 bf16/fp16 MACs per cycle (~4,096 int8/fp8).  One K step of a kernel
whose K loop holds ``I`` PTX instructions per thread and ``MACs`` tensor-core work costs

    mma_cycles   = MACs / rate(operand dtype)
    issue_cycles = I * num_warps / 4
    fraction of bf16 peak = (MACs / 2048) / max(mma_cycles, issue_cycles)

so an MMA-bound bf16 loop predicts 1.0 and an MMA-bound int8 loop 2.0.  PTX is counted, not SASS
(ptxas folds some moves and splits nothing we use), and memory stalls are ignored: the model says
whether the loop CAN keep the tensor cores fed, which is what decoding packed operands threatens.

:func:`k_loop` finds the K loop: the innermost PTX loop (a label and the backward branch to it)
that holds an MMA (``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80).  :func:`predict` applies
the model.  ``python -m pallas_kernels.gpu_check --budget`` runs both over every kernel.
"""
from __future__ import annotations

import dataclasses
import re

__all__ = ["H100", "Peak", "Mma", "KLoop", "Budget", "k_loop", "predict", "bandwidth_seconds"]


@dataclasses.dataclass(frozen=True)
class Peak:
    """Per-SM throughput figures of the model."""

    issue_per_cycle: int = 4  # warp-instructions per cycle per SM (4 schedulers)
    macs_per_cycle: tuple = (("bf16", 2048), ("f16", 2048), ("tf32", 1024), ("e4m3", 4096), ("e5m2", 4096),
                             ("s8", 4096), ("u8", 4096))
    bytes_per_second: float = 3.35e12  # HBM3 (H100 SXM); H200: 4.8e12
    bf16_flops: float = 989e12  # dense bf16 tensor-core peak, whole chip
    sms: int = 132

    def rate(self, dtype: str) -> int:
        return dict(self.macs_per_cycle)[dtype]


H100 = Peak()

_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")
_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.\S*?m(\d+)n(\d+)k(\d+)\.(\S+?)\s")
_NTID = re.compile(r"\.(?:maxntid|reqntid)\s+(\d+)")


@dataclasses.dataclass(frozen=True)
class Mma:
    """One MMA opcode in the loop: ``count`` per thread per step, shape, operand dtype."""

    opcode: str  # "wgmma" (warpgroup-wide) or "mma" (warp-wide)
    m: int
    n: int
    k: int
    dtype: str  # operand dtype (bf16, f16, tf32, e4m3, e5m2, s8, u8)
    count: int

    @property
    def shape(self) -> str:
        return f"m{self.m}n{self.n}k{self.k}"

    def macs(self, num_warps: int) -> int:
        """MACs of all ``count`` instructions over the whole CTA."""
        groups = num_warps // 4 if self.opcode == "wgmma" else num_warps
        return self.count * self.m * self.n * self.k * groups


@dataclasses.dataclass(frozen=True)
class KLoop:
    instructions: int  # PTX instructions per thread per iteration
    mmas: tuple  # of Mma
    first_line: int  # 1-based line numbers of the loop header label and the back branch
    last_line: int
    num_warps: int | None  # from .maxntid / .reqntid (None if absent)
    moves: int = 0  # of the instructions, ``mov`` (register copies / constants; ptxas folds most of them)

    def mma_summary(self) -> str:
        return ", ".join(f"{m.count}x {m.opcode} {m.shape} {m.dtype}" for m in self.mmas)


@dataclasses.dataclass(frozen=True)
class Budget:
    instructions: int
    num_warps: int
    macs: int  # all tensor-core MACs per step
    useful_macs: int  # the GEMM's own MACs per step (a Hadamard rotation by MMA is not useful work)
    mma_cycles: float
    issue_cycles: float

    @property
    def fraction_of_bf16_peak(self) -> float:
        """Predicted GEMM throughput relative to bf16 tensor-core peak (1.0 = a bf16 GEMM's ceiling)."""
        return (self.useful_macs / H100.rate("bf16")) / max(self.mma_cycles, self.issue_cycles)

    @property
    def bound(self) -> str:
        return "mma" if self.mma_cycles >= self.issue_cycles else "issue"


def _stmts(line: str) -> list:
    code = line.split("//", 1)[0]
    out = []
    for stmt in code.split(";"):
        s = stmt.strip().lstrip("{}").strip()
        if not s or s.startswith(".") or s.startswith("$") or s.endswith(":"):
            continue
        out.append(s)
    return out


def _statements(line: str) -> int:
    """PTX instructions on one line (directives, labels, braces and comments count 0)."""
    return len(_stmts(line))


def _mma_dtype(suffix: str) -> str:
    """``f32.bf16.bf16`` / ``row.col.f32.bf16.bf16.f32`` / ``s32.s8.s8`` -> operand dtype."""
    parts = [p for p in suffix.split(".") if p not in ("row", "col", "satfinite")]
    return parts[1] if len(parts) > 1 else parts[0]


def k_loop(ptx: str) -> KLoop:
    """The innermost loop of ``ptx`` holding an MMA instruction; ValueError if there is none."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    loops = []  # (header, back-branch) line indices
    for j, line in enumerate(lines):
        m = _BRANCH.search(line.split("//", 1)[0])
        if m and m.group(1) in labels and labels[m.group(1)] < j:
            loops.append((labels[m.group(1)], j))
    mma_lines = [i for i, line in enumerate(lines) if _MMA.search(line.split("//", 1)[0] + " ")]
    cands = [(b - a, a, b) for a, b in loops if any(a < i < b for i in mma_lines)]
    if not cands:
        raise ValueError("no loop holding an MMA instruction (wgmma / mma.sync) in this PTX")
    _, a, b = min(cands)
    counts: dict = {}
    for i in range(a, b + 1):
        m = _MMA.search(lines[i].split("//", 1)[0] + " ")
        if m:
            op = "wgmma" if m.group(1).startswith("wgmma") else "mma"
            key = (op, int(m.group(2)), int(m.group(3)), int(m.group(4)), _mma_dtype(m.group(5)))
            counts[key] = counts.get(key, 0) + 1
    mmas = tuple(Mma(*key, count=c) for key, c in sorted(counts.items()))
    ntid = _NTID.search(ptx)
    warps = int(ntid.group(1)) // 32 if ntid else None
    stmts = [st for i in range(a + 1, b + 1) for st in _stmts(lines[i])]
    moves = sum(st.split()[0].startswith("mov.") for st in stmts)
    return KLoop(len(stmts), mmas, a + 1, b + 1, warps, moves)


def predict(loop: KLoop, num_warps: int | None = None, peak: Peak = H100, useful_macs: int | None = None) -> Budget:
    """Apply the issue model to a K loop (``num_warps`` defaults to the PTX's .maxntid).

    ``useful_macs``: the GEMM's MACs per loop iteration (``bm * bn * k_step``); default: all MMA work.
    """
    warps = num_warps or loop.num_warps
    if not warps:
        raise ValueError("num_warps unknown: the PTX has no .maxntid; pass num_warps")
    macs = sum(m.macs(warps) for m in loop.mmas)
    mma_cycles = sum(m.macs(warps) / peak.rate(m.dtype) for m in loop.mmas)
    issue = loop.instructions * warps / peak.issue_per_cycle
    return Budget(loop.instructions, warps, macs, macs if useful_macs is None else useful_macs, mma_cycles, issue)


def bandwidth_seconds(nbytes: float, peak: Peak = H100) -> float:
    """Time to stream ``nbytes`` at the HBM bandwidth of the model."""
    return nbytes / peak.bytes_per_second
