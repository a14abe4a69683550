"""``pqjax bench``: parameter memory of the bf16 and quantized models (abstract: no weights are allocated) and the
jitted per-step time of the float vs quantized transformer on the current device.

Library use::

    from pqjax.commands.bench import memory_report
    memory_report(FluxConfig.flux_dev())["nvfp4"]["ratio"]     # 3.5x, from shapes only
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time

PRESETS = ("flux-dev", "flux-schnell", "tiny")

log = logging.getLogger("pqjax.commands")


def add_parser(sub):
    from pqjax.commands import options

    p = sub.add_parser(
        "bench", help="parameter memory (bf16 vs quantized) and per-step time (float vs quantized)",
        description="Parameter bytes of the bf16 model and of each quantized format under the quantization rules, "
                    "computed abstractly from the shapes (no weights are allocated, so flux-dev works anywhere), and "
                    "unless --memory, the jitted per-step (one transformer forward) time of the float vs quantized "
                    "model with random weights on the current device.")
    p.add_argument("--preset", default="flux-dev", metavar="PRESET",
                   help="flux-dev (default), flux-schnell, tiny, or CONFIG: a config.json, a diffusers model or "
                        "pipeline folder, or a pqjax checkpoint")
    p.add_argument("--memory", action="store_true", help="parameter memory only (no timing)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward steps per model (default: 5)")
    options.old_flag(p, "--steps", "--repeats", dest="repeats", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    options.add_quantization(p, formats_plural=True)
    p.add_argument("--height", type=int, default=None, help="image height for timing (default: 1024 for FLUX "
                                                             "presets, else 256)")
    p.add_argument("--width", type=int, default=None, help="image width for timing (default: as --height)")
    options.old_flag(p, "--size", "--height and --width", dest="height",
                     convert=lambda v, parser, flag: dict(zip(("height", "width"),
                                                              options.parse_size(v, parser, flag))))
    p.add_argument("--txt-tokens", type=int, help="text tokens for timing (default: 512 dev, 256 schnell, else 64)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for timing (default: 1)")
    options.old_flag(p, "--batch", "--batch-size", dest="batch_size", type=int)
    return p


# ---------------------------------------------------------------------------------------------- configs

def resolve_preset(preset: str):
    from pqjax.commands import CommandError
    from pqjax.io import MANIFEST
    from pqjax.models.flux import FluxConfig
    if preset == "flux-dev":
        return "FLUX.1-dev", FluxConfig.flux_dev()
    if preset == "flux-schnell":
        return "FLUX.1-schnell", FluxConfig.flux_schnell()
    if preset == "tiny":
        return "tiny FLUX", FluxConfig.tiny()
    path = preset
    if os.path.isdir(path):
        for cand in (MANIFEST, "config.json", os.path.join("transformer", "config.json")):
            if os.path.isfile(os.path.join(path, cand)):
                path = os.path.join(path, cand)
                break
        else:
            raise CommandError(f"--preset {preset}: a folder without {MANIFEST} or config.json")
    if not os.path.isfile(path):
        raise CommandError(f"--preset {preset}: not one of {', '.join(PRESETS)} and no such file")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CommandError(f"--preset {preset}: cannot read a JSON config ({e})") from None
    if isinstance(d, dict) and "model_config" in d:
        d = d["model_config"]
    if not isinstance(d, dict):
        raise CommandError(f"--preset {preset}: the config is not a JSON object")
    try:
        return os.path.basename(os.path.normpath(preset)), FluxConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CommandError(f"--preset {preset}: invalid FLUX config ({e})") from None


# ---------------------------------------------------------------------------------------------- memory

def quantize_tree(config, params, fmt, *, rules=None, group_size=None, method="rtn", perms: bool = True):
    """Quantize the rule-selected kernels of ``params`` without calibration (for byte counts and timing only):
    :func:`pqjax.stages.pack` with placeholder activation scales. ``method`` adds what it does at run time: the
    Hadamard rotation, SmoothQuant factors (ones), and, with ``perms``, an identity permutation under every norm
    that a P1/P3 permutation would use (its permuted read; the upper bound of PermuQuant's storage).
    Returns ``(qparams, {linear: "w4a4" | "w4a16"})``."""
    import jax.numpy as jnp
    import numpy as np

    from pqjax import stages
    from pqjax.config import DEFAULT_RULES, QuantConfig
    qc = QuantConfig(format=fmt, method=method, group_size=group_size, rules=DEFAULT_RULES if rules is None else rules)
    plan = stages.plan_linears(params, config, qc)
    if perms and qc.permutes:
        identity = {s.name: np.arange(s.k) for s in plan.active_sites if s.norm is not None}
        params = stages.absorb_all(params, identity, plan.sites)
    smooth = None
    if method == "smoothquant":
        from pqjax import sites as S
        smooth = {p: jnp.ones((S.get_path(params, p)["kernel"].shape[0],), jnp.float32)
                  for p, m in plan.modes.items() if m == "w4a4"}
    return stages.pack(params, plan, qc, smooth=smooth), {p: m for p, m in plan.modes.items() if m != "keep"}


def memory_report(config, formats=("nvfp4", "int4", "int3"), *, rules=None, group_size=None) -> dict:
    """Parameter bytes of the bf16 model and of each format's quantized model, from shapes alone (``jax.eval_shape``
    over :func:`quantize_tree`; quantized trees include activation scales and every P1/P3 permutation)."""
    import jax
    import jax.numpy as jnp

    from pqjax.formats import QTensor, nbytes, resolve_group
    from pqjax.models.flux import param_shapes
    shapes = param_shapes(config, jnp.bfloat16)
    base = nbytes(shapes)
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    out = {"params": n, "bf16_bytes": base, "bf16_gib": base / 2 ** 30}
    for fmt in formats:
        plan_box = {}

        def build(p, fmt=fmt):
            q, plan = quantize_tree(config, p, fmt, rules=rules, group_size=group_size, method="permuquant")
            plan_box["plan"] = plan
            return q

        q = jax.eval_shape(build, shapes)
        b = nbytes(q)
        plan = plan_box["plan"]
        qlin = sum(math.prod(l.shape) for l in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, QTensor))
                   if isinstance(l, QTensor))
        out[fmt] = {"bytes": b, "gib": b / 2 ** 30, "ratio": base / b,
                    "group_size": resolve_group(fmt, group_size),
                    "w4a4_linears": sum(m == "w4a4" for m in plan.values()),
                    "w4a16_linears": sum(m == "w4a16" for m in plan.values()),
                    "quantized_params": qlin, "quantized_fraction": qlin / n}
    return out


# ---------------------------------------------------------------------------------------------- timing

def _available_bytes():
    import jax
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return dev, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except Exception:  # noqa: BLE001 - backends without memory stats
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return dev, int(line.split()[1]) * 1024
    except OSError:
        pass
    return dev, None


def time_forward(config, params, *, batch, height, width, txt_tokens, steps, dtype) -> dict:
    """Median/min wall time of one jitted transformer forward (a sampler step) over ``steps`` runs after two
    warm-up runs (compilation, then first-run effects)."""
    import jax
    import jax.numpy as jnp

    from pqjax.models import flux
    from pqjax.pipeline import latent_size, prepare_img_ids, prepare_txt_ids
    h, w = latent_size(height, width)
    n_img = (h // 2) * (w // 2)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, n_img, config.in_channels), dtype)
    ctx = jax.random.normal(keys[1], (batch, txt_tokens, config.joint_attention_dim), dtype)
    pooled = jax.random.normal(keys[2], (batch, config.pooled_projection_dim), dtype)
    t = jnp.full((batch,), 0.5, dtype)
    g = jnp.full((batch,), 3.5, jnp.float32) if config.guidance_embeds else None
    img_ids, txt_ids = prepare_img_ids(h // 2, w // 2), prepare_txt_ids(txt_tokens)

    @jax.jit
    def step(p, x, ctx, pooled, t, g):
        return flux.forward(config, p, hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                            timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=g)

    t0 = time.perf_counter()
    step(params, x, ctx, pooled, t, g).block_until_ready()
    first = time.perf_counter() - t0
    step(params, x, ctx, pooled, t, g).block_until_ready()   # the first run after compiling can be much slower
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(params, x, ctx, pooled, t, g).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "first_call_s": first, "steps": steps}


def timing_report(config, formats, *, method, rules, group_size, batch, height, width, txt_tokens, steps) -> dict:
    import jax
    import jax.numpy as jnp

    from pqjax.commands import CommandError
    from pqjax.formats import nbytes
    from pqjax.models.flux import init_params
    mem = memory_report(config, formats, rules=rules, group_size=group_size)
    need = mem["bf16_bytes"] + max([mem[f]["bytes"] for f in formats] or [0])
    dev, avail = _available_bytes()
    if avail is not None and need > 0.85 * avail:
        raise CommandError(f"timing this model needs about {need / 2 ** 30:.1f} GiB of {dev.platform} memory for "
                           f"the weights alone but {avail / 2 ** 30:.1f} GiB are free: use --memory (abstract byte "
                           "counts) or a smaller --preset (e.g. tiny)")
    dtype = jnp.bfloat16
    log.info("random %s weights (%.3g GiB) on %s ...", jnp.dtype(dtype).name, mem["bf16_gib"], dev.device_kind)
    params = init_params(config, jax.random.key(0), dtype=dtype)
    kw = dict(batch=batch, height=height, width=width, txt_tokens=txt_tokens, steps=steps, dtype=dtype)
    res = {"device": f"{dev.platform}:{dev.device_kind}", "batch": batch, "height": height, "width": width,
           "txt_tokens": txt_tokens, "method": method}
    log.info("timing the float model ...")
    res["bf16"] = time_forward(config, params, **kw)
    for fmt in formats:
        log.info("quantizing (%s) and timing ...", fmt)
        q, _ = quantize_tree(config, params, fmt, rules=rules, group_size=group_size, method=method)
        q = jax.block_until_ready(q)
        r = time_forward(config, q, **kw)
        r["speedup"] = res["bf16"]["median_ms"] / r["median_ms"]
        r["bytes"] = nbytes(q)
        res[fmt] = r
        del q
    del params
    return res


# ---------------------------------------------------------------------------------------------- run

def run(args) -> int:
    from pqjax.commands import CommandError
    from pqjax.commands.common import check_positive, check_size, read_rules

    name, config = resolve_preset(args.preset)
    rules = read_rules(args.rules) if args.rules else None
    if args.group_size is not None:
        from pqjax.formats import INT_GROUP_SIZES
        if args.group_size not in INT_GROUP_SIZES:
            raise CommandError(f"--group-size must be one of {INT_GROUP_SIZES}, got {args.group_size}")
    check_positive(args.repeats, "--repeats")
    check_positive(args.batch_size, "--batch-size")
    formats = args.format
    flux_preset = args.preset in ("flux-dev", "flux-schnell")
    mem = memory_report(config, formats, rules=rules, group_size=args.group_size)
    out = {"preset": name, "config": config.to_dict(), **mem}
    timing = None
    if not args.memory:
        height = args.height or (1024 if flux_preset else 256)
        width = args.width or height
        check_size(height, width)
        txt = args.txt_tokens or {"flux-dev": 512, "flux-schnell": 256}.get(args.preset, 64)
        timing = timing_report(config, formats, method=args.method, rules=rules, group_size=args.group_size,
                               batch=args.batch_size, height=height, width=width, txt_tokens=txt,
                               steps=args.repeats)
        out["timing"] = timing
    if args.json:
        print(json.dumps(out))
        return 0
    n = mem["params"]
    print(f"{name}: {n / 1e9:.2f}B parameters" if n >= 1e8 else f"{name}: {n / 1e6:.2f}M parameters", end="")
    print(f"; parameter memory from shapes (no weights allocated), {'custom' if rules else 'default'} rules")
    unit, div = ("GiB", 2 ** 30) if mem["bf16_bytes"] >= 2 ** 28 else ("MiB", 2 ** 20)
    print(f"{'model':<12} {'bytes':>16} {unit:>8} {'vs bf16':>8}  quantized linears")
    print(f"{'bf16':<12} {mem['bf16_bytes']:>16,} {mem['bf16_bytes'] / div:>8.2f} {1.0:>7.2f}x")
    for fmt in formats:
        m = mem[fmt]
        label = fmt if fmt == "nvfp4" else f"{fmt} g{m['group_size']}"
        print(f"{label:<12} {m['bytes']:>16,} {m['bytes'] / div:>8.2f} {m['ratio']:>7.2f}x  {m['w4a4_linears']} "
              f"W4A4 + {m['w4a16_linears']} weight-only ({100 * m['quantized_fraction']:.1f}% of the parameters)")
    if timing is not None:
        print(f"\nper-step time on {timing['device']} (one jitted forward, batch {timing['batch']}, "
              f"{timing['height']}x{timing['width']}, {timing['txt_tokens']} text tokens; median of {args.repeats}):")
        print(f"{'bf16':<24} {timing['bf16']['median_ms']:>10.2f} ms")
        for fmt in formats:
            t = timing[fmt]
            print(f"{fmt + ' ' + args.method:<24} {t['median_ms']:>10.2f} ms  ({t['speedup']:.2f}x vs bf16)")
    return 0
