"""GPU check + benchmark of the quantized linears and a FLUX.1-dev-shaped forward: ``python -m pallas_kernels.bench``.

On an NVIDIA GPU (``examples/gpu_check.sh`` runs exactly this, writing ``--out``):

1. ``check``: the activation-quantize kernel against the XLA reference evaluated on the HOST CPU (IEEE
   divisions; XLA:GPU's own f32 division is approximate): codes and scales must be bit-identical.  The
   GEMM kernels against the reference: the largest ``|kernel - ref| / (|x| @ |w|)`` and the rows above
   ``1e-5`` (fp32 accumulation; tensor cores round their sums differently from XLA).
2. ``gemm``: median time of the GEMMs at FLUX shapes (M = 64 and 4608 tokens): XLA bf16, the packed W4A4
   GEMMs (nvfp4, int4 g64 / g128; the activation pass separately and together), W4A16, XLA fp8 and
   ``jax.nn.scaled_dot_general``'s nvfp4 path where it runs; TFLOP/s and the ratio to bf16 side by side.
3. ``flux``: a FLUX.1-dev-shaped forward (random weights, 1024x1024 -> 4096 image + 512 text tokens), bf16
   vs NVFP4 W4A4 (default rules: modulation weight-only, embedders / norm_out / proj_out 16-bit, the rest
   W4A4 with a permutation at every P1/P3 site so the fused gather is timed): one double and one single block
   first (fast to compile), then the whole forward.

Every table is printed and appended to ``--out`` (markdown) as soon as it is measured, so a run cut short
keeps what it finished.  ``--dry-run`` runs the same code on CPU in interpret mode at tiny shapes (a test).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = ((3072, 3072), (3072, 12288), (12288, 3072))  # (K, N): attention/out, MLP up, MLP down
M_LIST = (64, 4608)


def _time(fn, *args, reps: int, rounds: int) -> float:
    """Median seconds per call: ``rounds`` x (``reps`` calls, then block_until_ready)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def _try_time(make, *, reps, rounds):
    try:
        fn, args = make()
        return _time(fn, *args, reps=reps, rounds=rounds)
    except Exception as e:  # unsupported on this GPU / backend
        return f"n/a ({type(e).__name__})"


def on_nvidia_gpu() -> bool:
    try:
        return jax.devices()[0].platform == "gpu"
    except RuntimeError:
        return False


class Report:
    """Prints tables and appends them to a markdown file as they complete."""

    def __init__(self, path):
        self.path = path

    def table(self, title, header, rows, note=""):
        lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        if note:
            lines.append(f"\n{note}")
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(text)


def _operands(m, k, n, fmt, group, seed=0):
    from pqjax.formats import NVFP4_RANGE, quantize

    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w_f = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    w = jax.jit(lambda w: quantize(w, fmt, axis=0, group_size=group))(w_f)
    gx = jnp.float32(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / NVFP4_RANGE)
    return x, w_f, w, gx


def _impl(dry):
    import pallas_kernels as pk

    return pk.use_impl("interpret" if dry else None)


# --------------------------------------------------------------------------------------------
# 1. numerics on the device
# --------------------------------------------------------------------------------------------
def check(report, *, dry, m=512, k=3072, n=1024):
    import pallas_kernels as pk
    from pallas_kernels import reference

    if dry:
        m, k, n = 64, 256, 128
    cpu = jax.devices("cpu")[0]
    rows = []
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)) * np.exp(rng.standard_normal((1, k))), jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(k).astype(np.int32))
    smooth = jnp.asarray(np.exp(0.3 * rng.standard_normal(k)), jnp.float32)
    gx = jnp.float32(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 2688 * 2)
    qcases = (("nvfp4", None, {}), ("nvfp4", None, dict(perm=perm, hadamard=True, smooth=smooth)),
              ("int4", 64, {}), ("int4", 64, dict(perm=perm, hadamard=True)), ("int3", 64, {}))
    for fmt, g, kw in qcases[1:3] if dry else qcases:
        args = dict(global_scale=gx if fmt == "nvfp4" else None, group_size=g, **kw)
        with _impl(dry):
            got = jax.jit(lambda x: pk.quantize_activation(x, fmt, **args))(x)
        with jax.default_device(cpu):
            ref = jax.jit(lambda x: reference.quantize_activation(x, fmt, **args))(jax.device_put(x, cpu))
        bad_c = int(np.sum(np.asarray(got.codes) != np.asarray(ref.codes)))
        sg, sr = (np.asarray(jax.lax.bitcast_convert_type(q.scales, jnp.uint8 if fmt == "nvfp4" else jnp.uint16))
                  for q in (got, ref))
        tag = f"quantize_activation {fmt}{'' if g is None else f' g{g}'}" + (" perm+had" if kw else "")
        rows.append((tag, f"{m}x{k}", f"{bad_c} / {got.codes.size} code bytes, {int(np.sum(sg != sr))} / {sg.size} "
                     "scales differ", "PASS" if bad_c == 0 and (sg == sr).all() else "FAIL"))
    gcases = (("w4a4", "nvfp4", None, jnp.bfloat16), ("w4a4", "int4", 64, jnp.bfloat16),
              ("w4a4", "int4", 128, jnp.bfloat16), ("w4a4", "int3", 64, jnp.bfloat16),
              ("w4a16", "nvfp4", None, jnp.bfloat16), ("w4a16", "nvfp4", None, jnp.float16),
              ("w4a16", "int4", 64, jnp.bfloat16))
    for op, fmt, g, dt in gcases[:2] + gcases[4:5] if dry else gcases:
        xx, _, w, gxx = _operands(m, k, n, fmt, g, seed=1)
        xx = xx.astype(dt)
        xv = xx.astype(jnp.float32)
        if op == "w4a4":
            xq = jax.jit(lambda x: reference.quantize_activation(x, fmt, global_scale=gxx if fmt == "nvfp4" else None,
                                                                  group_size=g))(xx)
            with _impl(dry):
                out = jax.jit(lambda xq, w: pk.w4a4_matmul(xq, w, out_dtype=jnp.float32))(xq, w)
            ref = jax.jit(lambda xq, w: reference.w4a4_matmul_packed(xq, w, out_dtype=jnp.float32))(xq, w)
            xv, gxs = reference.dequantize_act_parts(xq)
            xv = xv * (1.0 if gxs is None else gxs)
        else:
            with _impl(dry):
                out = jax.jit(lambda x, w: pk.w4a16_matmul(x, w, out_dtype=jnp.float32))(xx, w)
            ref = jax.jit(lambda x, w: reference.w4a16_matmul(x, w, out_dtype=jnp.float32))(xx, w)
        bound = jnp.abs(xv) @ jnp.abs(w.dequantize(jnp.float32))
        rel = np.asarray(jnp.max(jnp.abs(out - ref) / (bound + 1e-30), axis=1))
        tag = f"{op} {fmt}{'' if g is None else f' g{g}'} ({jnp.dtype(dt).name} x)"
        rows.append((tag, f"{m}x{k}x{n}", f"max rel {rel.max():.2e}, {int(np.sum(rel > 1e-5))} / {m} rows > 1e-5",
                     "PASS" if rel.max() <= 1e-5 else "FAIL"))
    report.table("Kernels vs XLA reference (on this device)", ["kernel", "shape", "result", "verdict"], rows,
                 "quantize_activation: reference evaluated on the host CPU (IEEE f32 division). GEMMs: relative to "
                 "|x| @ |w| (the fp32 accumulation bound).")
    return all(r[-1] == "PASS" for r in rows)


# --------------------------------------------------------------------------------------------
# 2. GEMM timings
# --------------------------------------------------------------------------------------------
def bench_gemm(report, *, dry, reps, rounds, m_list=M_LIST, shapes=SHAPES):
    import pallas_kernels as pk

    if dry:
        m_list, shapes, reps, rounds = (64,), ((256, 128),), 1, 1
    cols = ["bf16 (XLA)", "W4A4 nvfp4", "act pass", "W4A4+act", "W4A4 int4 g64", "W4A4 int4 g128", "W4A16 nvfp4",
            "W4A16 int4", "fp8 (XLA)", "sdg nvfp4"]
    rows = []
    kw = dict(reps=reps, rounds=rounds)
    for k, n in shapes:
        for m in m_list:
            flops = 2.0 * m * k * n
            x, w_f, wn, gx = _operands(m, k, n, "nvfp4", None)
            res = {}
            bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
            res["bf16 (XLA)"] = _try_time(lambda: (bf16, (x, w_f)), **kw)
            with _impl(dry):
                quant = jax.jit(lambda x, g: pk.quantize_activation(x, "nvfp4", global_scale=g))
                xq = quant(x, gx)
                res["W4A4 nvfp4"] = _try_time(lambda: (jax.jit(lambda q, w: pk.w4a4_matmul(q, w)), (xq, wn)), **kw)
                res["act pass"] = _try_time(lambda: (quant, (x, gx)), **kw)
                res["W4A4+act"] = _try_time(lambda: (jax.jit(lambda x, w, g: pk.w4a4_matmul(x, w, act_global_scale=g)),
                                                     (x, wn, gx)), **kw)
                for g in (64, 128):
                    _, _, wi, _ = _operands(m, k, n, "int4", g)
                    xqi = jax.jit(lambda x: pk.quantize_activation(x, "int4", group_size=g))(x)
                    res[f"W4A4 int4 g{g}"] = _try_time(lambda: (jax.jit(lambda q, w: pk.w4a4_matmul(q, w)), (xqi, wi)),
                                                       **kw)
                res["W4A16 nvfp4"] = _try_time(lambda: (jax.jit(lambda a, w: pk.w4a16_matmul(a, w)), (x, wn)), **kw)
                _, _, wi, _ = _operands(m, k, n, "int4", 64)
                res["W4A16 int4"] = _try_time(lambda: (jax.jit(lambda a, w: pk.w4a16_matmul(a, w)), (x, wi)), **kw)
            x8, w8 = x.astype(jnp.float8_e4m3fn), w_f.astype(jnp.float8_e4m3fn)
            res["fp8 (XLA)"] = _try_time(lambda: (jax.jit(lambda a, b: jax.lax.dot_general(
                a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16)), (x8, w8)), **kw)

            def make_sdg():
                cfg = jax.nn.get_scaled_dot_general_config("nvfp4", global_scale=gx)
                f = jax.jit(lambda a, b: jax.nn.scaled_dot_general(
                    a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16, configs=[cfg, cfg]))
                return f, (x, w_f.T)

            res["sdg nvfp4"] = _try_time(make_sdg, **kw) if not dry else "n/a (CPU)"
            t_bf16 = res["bf16 (XLA)"]

            def cell(c):
                t = res[c]
                if isinstance(t, str):
                    return t
                ratio = t_bf16 / t if isinstance(t_bf16, float) else float("nan")
                if c == "act pass":
                    return f"{t * 1e6:.1f} us"
                return f"{flops / t / 1e12:.3g} TF/s ({ratio:.2f}x)"

            rows.append([m, k, n] + [cell(c) for c in cols])
            if isinstance(res["W4A4 nvfp4"], float) and isinstance(res["sdg nvfp4"], float):
                rows[-1][-1] += f" [W4A4 {res['sdg nvfp4'] / res['W4A4 nvfp4']:.2f}x faster]"
    report.table("GEMMs (median time; TFLOP/s = 2MKN / t; ratio = speed vs XLA bf16)", ["M", "K", "N"] + cols, rows,
                 "W4A4 nvfp4 / int4: the packed x packed GEMM alone (the activation quantized once per site is "
                 "shared by its linears); W4A4+act: quantize_activation + GEMM on a bf16 x.")


# --------------------------------------------------------------------------------------------
# 3. FLUX.1-dev-shaped forward
# --------------------------------------------------------------------------------------------
def _flux_params(config, *, dry):
    """Random bf16 FLUX params and their NVFP4 packing by ``pqjax.stages`` (default rules; placeholder activation
    scales: no calibration), plus a random permutation at every P1/P3 site (timing the fused gather)."""
    from pqjax import sites as S
    from pqjax import stages
    from pqjax.config import QuantConfig
    from pqjax.models import flux

    params = jax.jit(lambda k: flux.init_params(config, k, dtype=jnp.bfloat16))(jax.random.key(0))
    qc = QuantConfig(format="nvfp4", method="rtn")
    q = stages.pack(params, stages.plan_linears(params, config, qc), qc)
    rng = np.random.default_rng(0)
    for site in S.flux_sites(config):  # not absorbed: the output is meaningless, the work is the real one
        if site.norm is not None:
            norm = dict(S.get_path(q, site.norm)) if _has(q, site.norm) else {}
            norm["perm"] = jnp.asarray(rng.permutation(site.k).astype(np.int32))
            q = S.set_path(q, site.norm, norm)
    return params, q


def _has(params, path):
    from pqjax import sites as S

    try:
        S.get_path(params, path)
        return True
    except KeyError:
        return False


def bench_flux(report, *, dry, reps, rounds, blocks=True, full=True):
    from pqjax.models import flux
    from pqjax.models.flux import FluxConfig

    if dry:
        config, n_img, n_txt, reps, rounds = FluxConfig.tiny(num_layers=1, num_single_layers=1), 16, 8, 1, 1
    else:
        config, n_img, n_txt = FluxConfig.flux_dev(), 4096, 512
    params, q = _flux_params(config, dry=dry)
    r = np.random.default_rng(1)
    inputs = dict(hidden_states=jnp.asarray(r.standard_normal((1, n_img, config.in_channels)), jnp.bfloat16),
                  encoder_hidden_states=jnp.asarray(r.standard_normal((1, n_txt, config.joint_attention_dim)),
                                                    jnp.bfloat16),
                  pooled_projections=jnp.asarray(r.standard_normal((1, config.pooled_projection_dim)), jnp.bfloat16),
                  timestep=jnp.full((1,), 0.5, jnp.bfloat16), guidance=jnp.full((1,), 3.5, jnp.bfloat16),
                  img_ids=jnp.asarray(r.integers(0, 64, (n_img, 3)), jnp.float32), txt_ids=jnp.zeros((n_txt, 3)))
    # per-block cost from whole forwards of sub-models (public API only): t(1 double) - t(no blocks), etc.
    import dataclasses

    def sub(p, nd, ns):
        return {**p, "transformer_blocks": {str(i): p["transformer_blocks"][str(i)] for i in range(nd)},
                "single_transformer_blocks": {str(i): p["single_transformer_blocks"][str(i)] for i in range(ns)}}

    times = {}
    for nd, ns in ((0, 0), (1, 0), (0, 1)) if blocks else ():
        cfg = dataclasses.replace(config, num_layers=nd, num_single_layers=ns)
        fwd = jax.jit(lambda p, cfg=cfg: flux.forward(cfg, p, **inputs))
        for tag, pp, ctxm in (("bf16", params, contextlib.nullcontext()), ("nvfp4 W4A4", q, _impl(dry))):
            with ctxm:
                times[(nd, ns, tag)] = _try_time(lambda: (fwd, (sub(pp, nd, ns),)), reps=reps, rounds=rounds)

    def diff(a, b):
        return a - b if isinstance(a, float) and isinstance(b, float) else "n/a"

    rows, est = [], {}
    for name, key in (("double block", (1, 0)), ("single block", (0, 1))) if blocks else ():
        rows.append(_flux_row(name, diff(times[key + ("bf16",)], times[(0, 0, "bf16")]),
                              diff(times[key + ("nvfp4 W4A4",)], times[(0, 0, "nvfp4 W4A4")])))
    for tag in ("bf16", "nvfp4 W4A4") if blocks else ():
        d = diff(times[(1, 0, tag)], times[(0, 0, tag)])
        s_ = diff(times[(0, 1, tag)], times[(0, 0, tag)])
        est[tag] = (times[(0, 0, tag)] + config.num_layers * d + config.num_single_layers * s_
                    if isinstance(d, float) and isinstance(s_, float) else "n/a")
    if blocks:
        rows.append(_flux_row(f"embed + {config.num_layers} x double + {config.num_single_layers} x single (sum)",
                              est["bf16"], est["nvfp4 W4A4"]))
        report.table("FLUX.1-dev-shaped blocks (batch 1, 1024x1024: 4096 image + 512 text tokens)",
                     ["what", "bf16", "nvfp4 W4A4", "quantized / bf16 speed"], rows,
                     "block = forward with one block minus forward with none (embedders and final layer alone).")
    if not full:
        return
    rows = []
    f_t = {}
    for tag, p, ctxm in (("bf16", params, contextlib.nullcontext()), ("nvfp4 W4A4", q, _impl(dry))):
        with ctxm:
            fwd = jax.jit(lambda p: flux.forward(config, p, **inputs))
            t0 = time.perf_counter()
            try:
                jax.block_until_ready(fwd(p))
                compile_s = time.perf_counter() - t0
                f_t[tag] = _time(fwd, p, reps=max(1, reps // 4), rounds=rounds)
            except Exception as e:
                compile_s, f_t[tag] = float("nan"), f"n/a ({type(e).__name__})"
        print(f"flux forward {tag}: first call {compile_s:.1f} s", flush=True)
    rows.append(_flux_row("whole forward (one denoising step)", f_t["bf16"], f_t["nvfp4 W4A4"]))
    report.table("FLUX.1-dev-shaped forward", ["what", "bf16", "nvfp4 W4A4", "quantized / bf16 speed"], rows)


def _flux_row(name, tb, tq):
    fmt = lambda t: t if isinstance(t, str) else f"{t * 1e3:.2f} ms"  # noqa: E731
    ratio = f"{tb / tq:.2f}x" if isinstance(tb, float) and isinstance(tq, float) else "n/a"
    return (name, fmt(tb), fmt(tq), ratio)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="append the markdown tables to this file")
    p.add_argument("--only", nargs="*", choices=("check", "gemm", "flux", "forward"),
                   default=("check", "gemm", "flux", "forward"),
                   help="sections: kernel checks, GEMM timings, FLUX blocks, the whole FLUX forward")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="CPU, interpret mode, tiny shapes (tests the script)")
    args = p.parse_args(argv)
    dry = args.dry_run
    report = Report(args.out)
    if not dry and not on_nvidia_gpu():
        print("no NVIDIA GPU present: timings need one (sm_80+). Use --dry-run to exercise the script on CPU.")
        return 0
    dev = jax.devices()[0]
    head = (f"device: {dev.device_kind} (compute capability {getattr(dev, 'compute_capability', '-')}), "
            f"jax {jax.__version__}{', DRY RUN (CPU, interpret mode)' if dry else ''}")
    print(head)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## pallas_kernels.bench: {head}\n")
    ok = True
    if "check" in args.only:
        ok = check(report, dry=dry)
    if "gemm" in args.only:
        bench_gemm(report, dry=dry, reps=args.reps, rounds=args.rounds)
    if "flux" in args.only or "forward" in args.only:
        bench_flux(report, dry=dry, reps=args.reps, rounds=args.rounds, blocks="flux" in args.only,
                   full="forward" in args.only)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
