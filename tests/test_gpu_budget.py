"""The static K-loop budget (pallas_kernels.budget): PTX loop finding, MMA accounting, the issue model."""
from __future__ import annotations

import dataclasses

import pytest

from pallas_kernels import budget, gpu_check

# A hand-written sm_90-style kernel: an outer loop around an inner K loop holding 2 wgmma, and a
# later loop without MMA.  The K loop body (label excluded, back branch included) holds 9
# instructions: 2 on one line, a 2-instruction inline-asm block, 2 wgmma, fence, add, branch.
_PTX = """
.visible .entry k(
	.param .u64 k_param_0
)
.maxntid 256, 1, 1
{
	.reg .b32 	%r<100>;
	mov.b32 	%r1, 0;
$L__BB0_1:                              // outer loop
	add.s32 	%r2, %r2, 1;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=2
	.loc	1 68 13
	lop3.b32 %r3, %r4, %r5, %r6, 0xEA; shl.b32 %r7, %r3, 4;
	// begin inline asm
	{
	.reg .b32 t;
	prmt.b32 t, %r1, %r2, 0x5140; mov.b32 %r8, t;
	}
	// end inline asm
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r10,%r11}, {%r12,%r13}, %rd1, 0, 1, 1, 0;
	wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%r14,%r15}, %rd2, %rd3, 0;
	add.s32 	%r9, %r9, 1;
	@%p1 bra 	$L__BB0_2;
// %bb.3:
	@%p2 bra 	$L__BB0_1;
$L__BB0_4:
	add.s32 	%r20, %r20, 1;
	@%p3 bra 	$L__BB0_4;
	ret;
}
"""


def test_k_loop_on_hand_written_ptx():
    loop = budget.k_loop(_PTX)
    assert loop.instructions == 9
    assert loop.num_warps == 8
    assert {(m.opcode, m.shape, m.dtype, m.count) for m in loop.mmas} == {
        ("wgmma", "m64n128k16", "bf16", 1), ("wgmma", "m64n128k32", "s8", 1)}
    b = budget.predict(loop)
    # 2 warpgroups: bf16 64*128*16*2 MACs at 2048/cycle + int8 64*128*32*2 at 4096/cycle
    assert b.macs == 64 * 128 * 16 * 2 + 64 * 128 * 32 * 2
    assert b.mma_cycles == pytest.approx(128 + 128)
    assert b.issue_cycles == pytest.approx(9 * 8 / 4)
    assert b.bound == "mma"
    assert b.fraction_of_bf16_peak == pytest.approx((b.macs / 2048) / 256)  # 1.5: half the work ran at int8 rate
    heavy = dataclasses.replace(loop, instructions=1024)
    hb = budget.predict(heavy, useful_macs=64 * 128 * 16 * 2)
    assert hb.bound == "issue" and hb.fraction_of_bf16_peak == pytest.approx(128 / (1024 * 8 / 4))


def test_k_loop_errors_and_mma_sync():
    with pytest.raises(ValueError, match="no loop holding an MMA"):
        budget.k_loop(".maxntid 128, 1, 1\n$L__BB0_1:\n\tadd.s32 %r1, %r1, 1;\n\t@%p1 bra $L__BB0_1;\n")
    ptx = ("$L__BB0_1:\n\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};\n"
           "\tmma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%r5}, {%r1}, {%r2}, {%r5};\n\t@%p1 bra $L__BB0_1;\n")
    loop = budget.k_loop(ptx)
    assert loop.num_warps is None and loop.instructions == 3
    with pytest.raises(ValueError, match="num_warps"):
        budget.predict(loop)
    b = budget.predict(loop, num_warps=4)
    assert b.macs == 4 * (16 * 8 * 16 + 16 * 8 * 32)  # mma.sync is per warp
    assert b.mma_cycles == pytest.approx(4 * 16 * 8 * 16 / 2048 + 4 * 16 * 8 * 32 / 4096)


def test_bf16_gemm_calibration_predicts_mma_bound():
    """The calibration point: a plain bf16 Pallas GEMM (128x128x64, 8 warps) compiled for sm_90 is MMA-bound."""
    if not gpu_check.have_triton():
        pytest.skip("the `triton` package is not installed (pip install triton)")
    (name, make, k_step), = [c for c in gpu_check.kernel_catalog() if c[0].startswith("bf16")]
    r = gpu_check.kernel_budget(name, make, k_step, m=256, k=512, n=256, m_small=64)
    assert [(m.opcode, m.shape, m.dtype) for m in r.loop.mmas] == [("wgmma", "m64n128k16", "bf16")]
    assert r.loop.mmas[0].count == 4  # K step 64 = 4 x k16 per warpgroup
    assert r.budget.bound == "mma" and r.budget.fraction_of_bf16_peak == pytest.approx(1.0)
    assert r.grid_large == 4 and r.grid_small == 2
