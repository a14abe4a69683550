"""Calibration: run the float model along the sampler's own trajectory and collect per-site statistics.

The trajectory is the sampler's (:func:`pqjax.pipeline.sample`: same schedule, timestep scaling, Euler update and
initial noise, :func:`pqjax.pipeline.prepare_latents`); a :class:`StatsObserver` rides along in its jitted loop.
For every tapped linear input (one per site activation) it collects, in fp32 over all calibration tokens
(prompts x denoising steps): the per-channel sum of squares and count (-> mu2_a), the per-channel absolute max
(SmoothQuant, NVFP4's static activation scale) and a fixed-size seeded random sample of rows (for the error E of
the permutation search). Statistics are plain reductions, so a batch sharded over a device mesh gives the same
numbers as one device. Memory stays bounded: rows are sampled per step, never stored whole.

Another per-site statistic is one field of :class:`SiteStats` plus one line in :meth:`StatsObserver.init` and
:func:`update_stats` (e.g. GPTQ's ``X^T X``: ``xtx`` ``[K, K]`` zeros, then ``xtx + x.T @ x``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from pqjax import progress as progress_mod
from pqjax.models import flux
from pqjax.models.flux import FluxConfig
from pqjax.pipeline import (FlowMatchConfig, check_text_inputs, latent_size, prepare_img_ids, prepare_latents,
                            prepare_txt_ids, sample)

__all__ = ["CalibBatch", "SiteStats", "StatsObserver", "update_stats", "calibrate"]

log = logging.getLogger(__name__)
_NO_BAD_STEP = 2**31 - 1


@dataclasses.dataclass
class CalibBatch:
    """Calibration inputs: prompt embeddings and the sampler settings whose trajectory is calibrated on.

    The defaults are the sampler's (``pqjax sample``): 1024x1024, 28 steps (4 for a model without guidance
    embedding, like FLUX.1-schnell), guidance 3.5, FLUX.1-dev's scheduler. ``latents`` (packed initial noise
    ``[B, N_img, in_channels]``) default to :func:`pqjax.pipeline.prepare_latents` of ``seed``. Give the
    pipeline's ``scheduler_config`` and ``vae_scale_factor`` (pixels per latent, 8 for FLUX's VAE), so that the
    calibrated trajectory is the one inference visits.
    """

    encoder_hidden_states: jax.Array
    pooled_projections: jax.Array
    height: int = 1024
    width: int = 1024
    num_inference_steps: int | None = None
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

    def steps_for(self, config: FluxConfig) -> int:
        """``num_inference_steps``, or the sampler's default for this model."""
        if self.num_inference_steps is not None:
            return int(self.num_inference_steps)
        return 28 if config.guidance_embeds else 4


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


def update_stats(stats: SiteStats, x: jax.Array, key: jax.Array, step, rows_per_step: int) -> SiteStats:
    """``stats`` after one step's activation ``x`` (rows sampled with ``key``)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = x.shape[0]
    idx = jax.random.choice(key, m, (rows_per_step,), replace=m < rows_per_step)
    rows = jax.lax.dynamic_update_slice(stats.rows, x[idx], (step * rows_per_step, 0))
    bad = ~jnp.all(jnp.isfinite(x))
    return SiteStats(sumsq=stats.sumsq + jnp.sum(jnp.square(x), axis=0),
                     amax=jnp.maximum(stats.amax, jnp.max(jnp.abs(x), axis=0)),
                     count=stats.count + m, rows=rows,
                     first_bad_step=jnp.where(bad, jnp.minimum(stats.first_bad_step, step), stats.first_bad_step))


@dataclasses.dataclass(frozen=True)
class StatsObserver:
    """The sampler observer (:class:`pqjax.pipeline.Observer`) that accumulates :class:`SiteStats` per tap;
    ``rows_per_step`` rows are sampled from each step's activation, seeded by ``seed``."""

    taps: tuple[str, ...]
    rows_per_step: int
    seed: int = 0

    def init(self, shapes, num_steps):
        stats = {n: SiteStats(jnp.zeros(shapes[n].shape[-1]), jnp.zeros(shapes[n].shape[-1]), jnp.zeros(()),
                              jnp.zeros((num_steps * self.rows_per_step, shapes[n].shape[-1])),
                              jnp.int32(_NO_BAD_STEP)) for n in self.taps}
        return stats, jax.random.key(self.seed)

    def update(self, state, step, inputs):
        stats, key = state
        keys = jax.random.split(jax.random.fold_in(key, step), len(self.taps))
        return {n: update_stats(stats[n], inputs[n], keys[j], step, self.rows_per_step)
                for j, n in enumerate(self.taps)}, key


def calibrate(config: FluxConfig, params, calib_batch, *, taps: Sequence[str], num_rows: int = 256, seed: int = 0,
              scheduler_config: FlowMatchConfig | None = None, progress: bool = False) -> dict[str, SiteStats]:
    """Collect :class:`SiteStats` for the inputs of the linears named in ``taps`` (module paths).

    Runs the float model over ``calib_batch``'s sampler trajectory (one jit). ``num_rows`` rows per tap are sampled
    (seeded by ``seed``; with replacement only where a step has fewer rows than needed). Raises ValueError naming the
    first site whose activations hold NaN/Inf, and for embeddings whose shapes disagree with the model.
    """
    b = CalibBatch.coerce(calib_batch)
    ctx = jnp.asarray(b.encoder_hidden_states)
    pooled = jnp.asarray(b.pooled_projections)
    batch = check_text_inputs(config, ctx, pooled, origin="calib_batch")
    steps = b.steps_for(config)
    latents = b.latents
    if latents is None:
        latents = prepare_latents(b.seed, batch, b.height, b.width, num_channels_latents=config.in_channels // 4,
                                  dtype=ctx.dtype, vae_scale_factor=b.vae_scale_factor)
    latents = jnp.asarray(latents)
    h, w = latent_size(b.height, b.width, b.vae_scale_factor)
    n_img = (h // 2) * (w // 2)
    if latents.shape != (batch, n_img, config.in_channels):
        raise ValueError(f"calib_batch.latents must be [{batch}, {n_img}, {config.in_channels}] for a "
                         f"{b.height}x{b.width} image, got {tuple(latents.shape)}")
    observer = StatsObserver(tuple(taps), max(1, math.ceil(num_rows / steps)), int(seed))
    with progress_mod.steps("calibrate", enabled=progress, log=log):
        _, (stats, _) = jax.block_until_ready(sample(
            config, params, latents=latents, encoder_hidden_states=ctx, pooled_projections=pooled,
            num_inference_steps=steps, guidance_scale=b.guidance_scale,
            scheduler_config=scheduler_config or b.scheduler_config or FlowMatchConfig(), height=b.height,
            width=b.width, vae_scale_factor=b.vae_scale_factor, progress=True, observer=observer))
    stats = {n: dataclasses.replace(s, rows=s.rows[:num_rows]) for n, s in stats.items()}
    bad = [n for n in taps if int(stats[n].first_bad_step) < _NO_BAD_STEP]
    if bad:  # name the first one (earliest step, then the model's call order): that is where the trouble starts
        order = []
        jax.eval_shape(lambda x: flux.forward(
            config, params, hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
            timestep=jnp.zeros(x.shape[0]), img_ids=prepare_img_ids(h // 2, w // 2),
            txt_ids=prepare_txt_ids(ctx.shape[1]), guidance=None if not config.guidance_embeds else
            jnp.zeros(x.shape[0]), tap=lambda n, a: order.append(n)), latents)
        first = min(bad, key=lambda n: (int(stats[n].first_bad_step), order.index(n)))
        raise ValueError(f"calibration: non-finite activations (NaN/Inf) at the input of {first} at denoising step "
                         f"{int(stats[first].first_bad_step)} ({len(bad)} tapped activations affected)")
    return stats
