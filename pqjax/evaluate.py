"""How far a quantized FLUX is from its float original: sampler outputs and per-site layer errors.

    res = pqjax.evaluate.compare(config, float_params, qparams, encoder_hidden_states=ctx, pooled_projections=pooled,
                                 seeds=(0, 1), num_inference_steps=28, height=512, width=512, perms=report.perms)
    print(pqjax.evaluate.markdown(res))

Metrics (per prompt x seed, both models from the same noise and embeddings):

* ``latent_rel_err``: ``||z_q - z_f|| / ||z_f||`` of the final packed latents.
* ``psnr`` / ``ssim`` against the float result: on decoded images (``decode`` given: a function from final packed
  latents ``[B, N, 64]`` to images ``[B, H, W, 3]`` in ``[0, 1]``, e.g. ``pqjax.pipeline.decode_images`` with a
  VAE; data range 1) or, without a VAE, on the unpacked latents ``[B, 16, H/8, W/8]`` (data range = the float
  latent's max - min). ``space`` says which.
  SSIM: Wang et al. 2004, Gaussian window (11, sigma 1.5; shrunk to the image for tiny latents), ``valid``
  filtering, mean over channels and positions, K1 = 0.01, K2 = 0.03.
* per-site errors (:func:`site_errors`): each quantized linear's output vs its float output on the SAME input
  (the permuted float model's activation at one point of the float trajectory), ``||y_q - y_f|| / ||y_f||``;
  aggregated per PermuQuant site.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import sites as S
from pqjax.models import flux
from pqjax.models.flux import FluxConfig
from pqjax.models.layers import dense, is_quantized
from pqjax.pipeline import (VAE_SCALE_FACTOR, latent_size, prepare_img_ids, prepare_latents, prepare_txt_ids, sample,
                            unpack_latents)
from pqjax.stages import absorb_all

__all__ = ["relative_error", "psnr", "ssim", "site_errors", "compare", "markdown"]


# ---------------------------------------------------------------------------------------------- metrics

def relative_error(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64 (``inf`` if ``ref`` is zero and ``x`` is not)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    num, den = np.linalg.norm(x - ref), np.linalg.norm(ref)
    return float(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def psnr(x, ref, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB of ``x`` against ``ref`` (``inf`` when identical)."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gauss(win: int, sigma: float) -> np.ndarray:
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of ``[..., H, W]``."""
    w = len(g)
    h_out, w_out = img.shape[-2] - w + 1, img.shape[-1] - w + 1
    rows = sum(g[i] * img[..., i:i + h_out, :] for i in range(w))
    return sum(g[j] * rows[..., :, j:j + w_out] for j in range(w))


def ssim(x, ref, data_range: float, *, win: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of images ``[..., C, H, W]`` (see the module docstring)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape or x.ndim < 2:
        raise ValueError(f"ssim: shapes {x.shape} and {ref.shape} differ or are not images")
    win = min(win, x.shape[-2], x.shape[-1])
    win -= (win + 1) % 2  # odd
    g = _gauss(win, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filter_valid(x, g), _filter_valid(ref, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(ref * ref, g) - my * my
    sxy = _filter_valid(x * ref, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(np.mean(s))


# ---------------------------------------------------------------------------------------------- per-site errors

def site_errors(config: FluxConfig, float_params, qparams, perms: dict | None, *, hidden_states,
                encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None
                ) -> dict[str, tuple[float, float]]:
    """Per quantized linear: ``(sum ||y_q - y_f||^2, sum ||y_f||^2)`` on the input the float model feeds it.

    ``perms``: the accepted permutations per site (``QuantReport.perms``); they are absorbed into ``float_params``
    exactly as ``pqjax.quantize`` did, so that the float and quantized linears read the same channel order. One jit;
    every error is reduced inside it (no activation is kept)."""
    fp = jax.tree.map(jnp.asarray, absorb_all(float_params, perms or {}, S.flux_sites(config)))
    names = tuple(p for p in S.linear_paths(qparams) if is_quantized(S.get_path(qparams, p)["kernel"]))
    run = _site_errors_fn(config, names)
    out = run(fp, qparams, jnp.asarray(hidden_states), jnp.asarray(encoder_hidden_states),
              jnp.asarray(pooled_projections), jnp.asarray(timestep), jnp.asarray(img_ids), jnp.asarray(txt_ids),
              None if guidance is None else jnp.asarray(guidance))
    return {n: (float(e), float(r)) for n, (e, r) in out.items()}


def _site_errors_fn(config, names):
    nameset = set(names)

    @jax.jit
    def run(fp, qp, x, ctx, pooled, t, img_ids, txt_ids, guidance):
        errs = {}

        def tap(name, a):
            if name in nameset and name not in errs:
                yf = dense(S.get_path(fp, name), a).astype(jnp.float32)
                yq = dense(S.get_path(qp, name), a).astype(jnp.float32)
                errs[name] = (jnp.sum(jnp.square(yq - yf)), jnp.sum(jnp.square(yf)))

        flux.forward(config, fp, hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, tap=tap)
        return errs

    return run


def aggregate_sites(config: FluxConfig, errs: dict[str, tuple[float, float]]) -> list[dict]:
    """Per-linear sums -> one row per PermuQuant site (``rel_err = sqrt(sum err / sum ref)``), in model order."""
    table = S.flux_sites(config)
    site_of = {c: s.name for s in table for c in s.consumers}
    rows: dict[str, list] = {s.name: [0.0, 0.0, 0] for s in table if any(c in errs for c in s.consumers)}
    for name, (e, r) in errs.items():
        acc = rows.setdefault(site_of.get(name, name), [0.0, 0.0, 0])
        acc[0] += e
        acc[1] += r
        acc[2] += 1
    return [{"site": s, "linears": n, "rel_err": math.sqrt(e / r) if r > 0 else math.inf}
            for s, (e, r, n) in rows.items()]


# ---------------------------------------------------------------------------------------------- compare

def compare(config: FluxConfig, float_params, qparams, *, encoder_hidden_states, pooled_projections,
            seeds: Sequence[int] = (0,), num_inference_steps: int = 28, height: int = 256, width: int = 256,
            guidance_scale: float = 3.5, dtype=None, perms: dict | None = None, per_site: bool = True,
            decode: Callable | None = None, scheduler_config=None, vae_scale_factor: int = VAE_SCALE_FACTOR,
            prompts: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Sample both models from the same seeds and embeddings (``[P, T, J]`` / ``[P, Pd]``: P prompts, batched) and
    measure the quantized one against the float one. Returns a JSON-able dict (see :func:`markdown`).

    Both start from :func:`pqjax.pipeline.prepare_latents` of each seed (image ``i`` = prompt ``i``), with the
    pipeline's ``scheduler_config`` and ``vae_scale_factor`` (pixels per latent of its VAE). ``prompts``: the
    prompts' text, shown in the tables."""
    ctx = jnp.asarray(encoder_hidden_states)
    pooled = jnp.asarray(pooled_projections)
    dtype = jnp.dtype(dtype or ctx.dtype)
    ctx, pooled = ctx.astype(dtype), pooled.astype(dtype)
    n_prompts = ctx.shape[0]
    if prompts is not None and len(prompts) != n_prompts:
        raise ValueError(f"compare: {len(prompts)} prompt texts for {n_prompts} embeddings")
    h, w = latent_size(height, width, vae_scale_factor)
    img_ids, txt_ids = prepare_img_ids(h // 2, w // 2), prepare_txt_ids(ctx.shape[1])
    space = "image" if decode is not None else "latent"
    samples, first = [], None
    for seed in seeds:
        noise = prepare_latents(int(seed), n_prompts, height, width, num_channels_latents=config.in_channels // 4,
                                dtype=dtype, vae_scale_factor=vae_scale_factor)
        kw = dict(latents=noise, encoder_hidden_states=ctx, pooled_projections=pooled,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                  width=width, vae_scale_factor=vae_scale_factor, progress=progress)
        if scheduler_config is not None:
            kw["scheduler_config"] = scheduler_config
        zf = np.asarray(sample(config, float_params, **kw), np.float32)
        zq = np.asarray(sample(config, qparams, **kw), np.float32)
        if first is None:
            first = (noise, zf)
        if decode is not None:   # images [B, H, W, 3] in [0, 1] -> channels first
            uf = np.asarray(decode(zf), np.float32).transpose(0, 3, 1, 2)
            uq = np.asarray(decode(zq), np.float32).transpose(0, 3, 1, 2)
        else:
            uf = np.asarray(unpack_latents(jnp.asarray(zf), height, width, vae_scale_factor), np.float32)
            uq = np.asarray(unpack_latents(jnp.asarray(zq), height, width, vae_scale_factor), np.float32)
        for i in range(n_prompts):
            rng = 1.0 if decode is not None else float(uf[i].max() - uf[i].min()) or 1.0
            samples.append({"prompt": i, "text": None if prompts is None else prompts[i], "seed": int(seed),
                            "latent_rel_err": relative_error(zq[i], zf[i]), "psnr": psnr(uq[i], uf[i], rng),
                            "ssim": ssim(uq[i], uf[i], rng)})
    mean = {k: float(np.mean([s[k] for s in samples])) for k in ("latent_rel_err", "psnr", "ssim")}
    res = {"space": space, "seeds": [int(s) for s in seeds], "prompts": n_prompts,
           "num_inference_steps": num_inference_steps, "height": height, "width": width,
           "guidance_scale": guidance_scale, "dtype": dtype.name, "samples": samples, "mean": mean}
    if per_site:
        # one point of the float trajectory: z_t = (1 - s) z_0 + s noise at s = 0.5 (first seed, all prompts)
        noise, zf = first
        sig = 0.5
        zt = ((1 - sig) * jnp.asarray(zf) + sig * noise.astype(jnp.float32)).astype(dtype)
        guidance = jnp.full((n_prompts,), guidance_scale, jnp.float32) if config.guidance_embeds else None
        errs = site_errors(config, float_params, qparams, perms, hidden_states=zt, encoder_hidden_states=ctx,
                           pooled_projections=pooled, timestep=jnp.full((n_prompts,), sig, dtype), img_ids=img_ids,
                           txt_ids=txt_ids, guidance=guidance)
        res["site_error_point"] = {"sigma": sig, "seed": int(seeds[0])}
        res["sites"] = aggregate_sites(config, errs)
        res["linears"] = {n: (math.sqrt(e / r) if r > 0 else math.inf) for n, (e, r) in errs.items()}
    return res


def _cell(text: str, limit: int = 60) -> str:
    """A prompt as a markdown table cell: one line, pipes escaped, long prompts cut."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def markdown(res: dict, *, title: str | None = None, max_sites: int | None = None) -> str:
    """Markdown tables of a :func:`compare` result (samples, mean, per-site errors worst first)."""
    space = "decoded images" if res["space"] == "image" else "unpacked latents (no VAE)"
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines += [f"{res['num_inference_steps']} steps, {res['height']}x{res['width']}, guidance {res['guidance_scale']}, "
              f"{res['dtype']}; PSNR/SSIM on {space}.", "",
              "| prompt | seed | latent rel. err | PSNR (dB) | SSIM |", "|---:|---:|---:|---:|---:|"]
    for s in res["samples"]:
        text = s.get("text")
        prompt = s["prompt"] if text is None else _cell(text)
        lines.append(f"| {prompt} | {s['seed']} | {s['latent_rel_err']:.4f} | {s['psnr']:.2f} | {s['ssim']:.4f} |")
    m = res["mean"]
    lines.append(f"| **mean** | | **{m['latent_rel_err']:.4f}** | **{m['psnr']:.2f}** | **{m['ssim']:.4f}** |")
    if res.get("sites"):
        sites = sorted(res["sites"], key=lambda r: -r["rel_err"])
        shown = sites if max_sites is None else sites[:max_sites]
        lines += ["", f"Per-site output error of the quantized linears (float input at sigma "
                      f"{res['site_error_point']['sigma']}, worst first"
                  + (f", {len(shown)} of {len(sites)}" if len(shown) < len(sites) else "") + "):", "",
                  "| site | linears | rel. err |", "|---|---:|---:|"]
        lines += [f"| {r['site']} | {r['linears']} | {r['rel_err']:.4f} |" for r in shown]
    return "\n".join(lines) + "\n"
