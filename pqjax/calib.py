"""Jitted calibration: run the float model along the sampler's trajectory and collect per-site statistics.

For every tapped linear input (one per site activation) this collects, in fp32 over all calibration tokens
(prompts x denoising steps): the per-channel sum of squares and count (-> mu2_a), the per-channel absolute max
(SmoothQuant, NVFP4's static activation scale) and a fixed-size seeded random sample of rows (for the error E of
the permutation search). The whole trajectory is one ``jax.jit`` (``lax.scan`` over steps); statistics are plain
reductions, so a batch sharded over a device mesh gives the same numbers as one device. Memory stays bounded:
rows are sampled per step, never stored whole.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.models import flux
from pqjax.models.flux import FluxConfig
from pqjax.pipeline import FlowMatchConfig, euler_step, flow_match_schedule, latent_size, prepare_img_ids


@dataclasses.dataclass
class CalibBatch:
    """Calibration inputs: prompt embeddings and the sampler settings whose trajectory is calibrated on.

    ``latents`` (packed initial noise ``[B, N_img, in_channels]``) default to seeded normal noise for the image size.
    ``scheduler_config`` (default FLUX.1-dev's) and ``vae_scale_factor`` (pixels per latent, default 8) should be
    what the model is sampled with, so the calibrated trajectory is the one inference visits.
    """

    encoder_hidden_states: jax.Array
    pooled_projections: jax.Array
    height: int = 256
    width: int = 256
    num_inference_steps: int = 4
    guidance_scale: float = 3.5
    latents: jax.Array | None = None
    seed: int = 0
    scheduler_config: FlowMatchConfig | None = None
    vae_scale_factor: int = 8

    @classmethod
    def coerce(cls, batch) -> "CalibBatch":
        if isinstance(batch, cls):
            return batch
        if isinstance(batch, dict):
            unknown = set(batch) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"calib_batch: unknown keys {sorted(unknown)}; expected fields of CalibBatch")
            return cls(**batch)
        raise TypeError(f"calib_batch must be a CalibBatch or a dict, got {type(batch).__name__}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SiteStats:
    """Statistics of one tapped activation ``[*, K]``."""

    sumsq: jax.Array      # [K] sum of x^2
    amax: jax.Array       # [K] max |x|
    count: jax.Array      # [] number of rows seen
    rows: jax.Array       # [R, K] sampled rows (fp32)
    first_bad_step: jax.Array  # [] first denoising step with a NaN/Inf in this activation (int32 max if none)

    @property
    def mu2(self) -> jax.Array:
        return self.sumsq / jnp.maximum(self.count, 1.0)


def _update(stats: SiteStats, x: jax.Array, key: jax.Array, step, rows_per_step: int) -> SiteStats:
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = x.shape[0]
    idx = jax.random.choice(key, m, (rows_per_step,), replace=m < rows_per_step)
    rows = jax.lax.dynamic_update_slice(stats.rows, x[idx], (step * rows_per_step, 0))
    bad = ~jnp.all(jnp.isfinite(x))
    return SiteStats(sumsq=stats.sumsq + jnp.sum(jnp.square(x), axis=0),
                     amax=jnp.maximum(stats.amax, jnp.max(jnp.abs(x), axis=0)),
                     count=stats.count + m, rows=rows,
                     first_bad_step=jnp.where(bad, jnp.minimum(stats.first_bad_step, step), stats.first_bad_step))


@functools.partial(jax.jit, static_argnames=("config", "taps", "rows_per_step", "progress"))
def _calibrate(config, params, latents, ctx, pooled, img_ids, txt_ids, timesteps, sigmas, guidance, key, *,
               taps, rows_per_step, progress):
    n_steps = timesteps.shape[0]
    B, dtype = latents.shape[0], latents.dtype
    tapset = set(taps)

    def run(x, t, tap):
        return flux.forward(config, params, hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                            timestep=jnp.broadcast_to(t, (B,)).astype(dtype) / 1000, img_ids=img_ids,
                            txt_ids=txt_ids, guidance=guidance, tap=tap)

    # shapes of every tapped activation, to size the buffers
    shapes = {}
    jax.eval_shape(lambda x: run(x, timesteps[0], lambda n, a: shapes.setdefault(n, a.shape) if n in tapset else None),
                   latents)
    missing = [t for t in taps if t not in shapes]
    if missing:
        raise ValueError(f"calibration: the model never calls linears {missing}")
    init = {n: SiteStats(jnp.zeros(shapes[n][-1]), jnp.zeros(shapes[n][-1]), jnp.zeros(()),
                         jnp.zeros((n_steps * rows_per_step, shapes[n][-1])), jnp.int32(2**31 - 1))
            for n in taps}

    def body(carry, i):
        x, stats = carry
        seen = {}
        v = run(x, timesteps[i], lambda n, a: seen.setdefault(n, a) if n in tapset else None)
        keys = jax.random.split(jax.random.fold_in(key, i), len(taps))
        stats = {n: _update(stats[n], seen[n], keys[j], i, rows_per_step) for j, n in enumerate(taps)}
        x = euler_step(x, v, sigmas[i], sigmas[i + 1]).astype(dtype)
        if progress:
            jax.debug.callback(_print_progress, i + 1, n_steps, x.reshape(-1)[0])
        return (x, stats), None

    (_, stats), _ = jax.lax.scan(body, (latents, init), jnp.arange(n_steps))
    return stats


def _print_progress(step, n, _anchor):
    print(f"\rpqjax calibrate: step {int(step)}/{int(n)}", end="\n" if int(step) == int(n) else "",
          file=sys.stderr, flush=True)


def calibrate(config: FluxConfig, params, calib_batch, *, taps: Sequence[str], num_rows: int = 256, seed: int = 0,
              scheduler_config: FlowMatchConfig | None = None, progress: bool = False) -> dict[str, SiteStats]:
    """Collect :class:`SiteStats` for the inputs of the linears named in ``taps`` (module paths).

    Runs the float model over ``calib_batch``'s sampler trajectory in one jit. ``num_rows`` rows per tap are sampled
    (seeded by ``seed``; with replacement only where a step has fewer rows than needed). Raises ValueError naming the
    first site whose activations hold NaN/Inf, and for embeddings whose shapes disagree with the model.
    """
    b = CalibBatch.coerce(calib_batch)
    ctx = jnp.asarray(b.encoder_hidden_states)
    pooled = jnp.asarray(b.pooled_projections)
    if ctx.ndim != 3 or ctx.shape[-1] != config.joint_attention_dim:
        raise ValueError(f"calib_batch.encoder_hidden_states must be [B, N_txt, {config.joint_attention_dim}] for "
                         f"this model, got {tuple(ctx.shape)}")
    if pooled.shape != (ctx.shape[0], config.pooled_projection_dim):
        raise ValueError(f"calib_batch.pooled_projections must be [{ctx.shape[0]}, {config.pooled_projection_dim}] "
                         f"for this model, got {tuple(pooled.shape)}")
    scheduler_config = scheduler_config or b.scheduler_config or FlowMatchConfig()
    h, w = latent_size(b.height, b.width, b.vae_scale_factor)
    n_img = (h // 2) * (w // 2)
    latents = b.latents
    if latents is None:
        latents = jax.random.normal(jax.random.key(b.seed), (ctx.shape[0], n_img, config.in_channels), ctx.dtype)
    latents = jnp.asarray(latents)
    if latents.shape != (ctx.shape[0], n_img, config.in_channels):
        raise ValueError(f"calib_batch.latents must be [{ctx.shape[0]}, {n_img}, {config.in_channels}] for a "
                         f"{b.height}x{b.width} image, got {tuple(latents.shape)}")
    timesteps, sigmas = flow_match_schedule(b.num_inference_steps, n_img, scheduler_config)
    guidance = jnp.full((ctx.shape[0],), b.guidance_scale, jnp.float32) if config.guidance_embeds else None
    rows_per_step = max(1, math.ceil(num_rows / b.num_inference_steps))
    stats = _calibrate(config, params, latents, ctx, pooled, prepare_img_ids(h // 2, w // 2),
                       jnp.zeros((ctx.shape[1], 3)), jnp.asarray(timesteps), jnp.asarray(sigmas), guidance,
                       jax.random.key(seed), taps=tuple(taps), rows_per_step=rows_per_step, progress=progress)
    stats = {n: dataclasses.replace(s, rows=s.rows[:num_rows]) for n, s in stats.items()}
    bad = [n for n in taps if int(stats[n].first_bad_step) < 2**31 - 1]
    if bad:  # name the first one (earliest step, then the model's call order): that is where the trouble starts
        order = []
        jax.eval_shape(lambda x: flux.forward(
            config, params, hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
            timestep=jnp.zeros(x.shape[0]), img_ids=prepare_img_ids(h // 2, w // 2), txt_ids=jnp.zeros((ctx.shape[1], 3)),
            guidance=guidance, tap=lambda n, a: order.append(n)), latents)
        first = min(bad, key=lambda n: (int(stats[n].first_bad_step), order.index(n)))
        raise ValueError(f"calibration: non-finite activations (NaN/Inf) at the input of {first} at denoising step "
                         f"{int(stats[first].first_bad_step)} ({len(bad)} tapped activations affected)")
    return stats
