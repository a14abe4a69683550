"""``pqjax.quantize``: calibrate -> search -> absorb -> pack, PermuQuant's pipeline figure top to bottom.

Each step is a function of :mod:`pqjax.stages` (rules, search, absorption, packing) or :mod:`pqjax.calib`
(the calibration pass over the sampler's trajectory); this module only runs them in order and times them.
"""
from __future__ import annotations

import logging
import time

from pqjax import calib, stages
from pqjax.config import QuantConfig
from pqjax.models.flux import FluxConfig
from pqjax.report import QuantReport

__all__ = ["quantize"]

log = logging.getLogger(__name__)


def quantize(params, calib_batch, *, config: QuantConfig = QuantConfig(), model_config: FluxConfig,
             progress: bool = True) -> tuple[dict, QuantReport]:
    """Quantize FLUX ``params`` with PermuQuant (or a baseline) -> ``(qparams, report)``.

    ``calib_batch``: a :class:`pqjax.CalibBatch` (or dict of its fields): prompt embeddings and the sampler
    settings whose float trajectory is calibrated on. ``qparams`` run through ``pqjax.models.flux.forward`` and the
    jitted sampler like float params. ``progress``: progress bars on a terminal; stage summaries go to the
    ``pqjax`` logger either way.
    """
    times = {}

    # 1. rules: which linears are W4A4, weight-only, or 16-bit
    plan = stages.plan_linears(params, model_config, config)

    # 2. calibrate: one jitted pass of the float model over the sampler trajectory
    t0 = time.perf_counter()
    log.info("calibrating %d activations", len(plan.taps))
    stats = calib.calibrate(model_config, params, calib_batch, taps=plan.taps, num_rows=config.calib_rows,
                            seed=config.calib_seed, progress=progress)
    times["calibrate"] = time.perf_counter() - t0

    # 3. search: per site, the permutation (or the baseline's transform) and its calibration error
    t0 = time.perf_counter()
    smooth = stages.smoothquant_factors(params, stats, plan, config) if config.method == "smoothquant" else {}
    sites, perms = stages.search_sites(params, stats, plan, config, smooth=smooth, progress=progress)
    times["search"] = time.perf_counter() - t0
    log.info("searched %d sites in %.1f s", len(sites), times["search"])

    # 4. absorb the accepted permutations into the float params (the permuted float model is exact), 5. pack
    t0 = time.perf_counter()
    qparams = stages.absorb_all(params, perms, plan.sites)
    qparams = stages.pack(qparams, plan, config, perms=perms, stats=stats, smooth=smooth)
    times["absorb+pack"] = time.perf_counter() - t0

    report = QuantReport(config, sites, plan.modes, plan.skipped, plan.unused_rules, times, perms)
    log.info(report.summary())
    return qparams, report
