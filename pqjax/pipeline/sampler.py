"""The FLUX denoising loop as ONE ``jax.jit``: flow-matching Euler over precomputed sigmas.

:func:`sample` reproduces ``FluxPipeline.__call__(..., latents=..., prompt_embeds=...,
pooled_prompt_embeds=..., output_type="latent")`` step for step:

* the schedule (sigmas, timesteps) is computed on the host exactly like FluxPipeline
  (:func:`pqjax.pipeline.scheduler.flow_match_schedule`) and enters the jitted loop as *arrays*,
  so a new resolution shift / custom sigmas / guidance scale reuses the compiled loop (only a new
  number of steps, new shapes or a new ``forward_fn`` retrace);
* every step calls ``forward_fn(config, params, hidden_states=x, timestep=t/1000, guidance=...)``
  with FluxPipeline's dtypes: ``timestep = t.expand(B).to(latents.dtype) / 1000``,
  ``guidance = full([B], guidance_scale, float32)`` only if ``config.guidance_embeds``;
* the Euler update is diffusers' ``scheduler.step`` (:func:`~pqjax.pipeline.scheduler.euler_step`).

``forward_fn`` defaults to :func:`pqjax.models.flux.forward`; quantized params go through the same
function, inside the same compiled loop.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import progress as progress_mod

from .latents import VAE_SCALE_FACTOR, latent_size, prepare_img_ids, prepare_txt_ids
from .prompts import check_text_inputs
from .scheduler import FlowMatchConfig, euler_step, flow_match_schedule

__all__ = ["sample", "denoise", "Observer"]

log = logging.getLogger(__name__)

ForwardFn = Callable[..., jnp.ndarray]


class Observer(Protocol):
    """Sees the inputs of some linears at every denoising step, inside the jitted loop (calibration is one).

    It is a static argument of the jit: hashable, compared by value (a frozen dataclass), holding no arrays.
    ``taps``: module paths of the linears whose inputs it wants (``forward_fn`` must take ``tap=``, as
    :func:`pqjax.models.flux.forward` does). ``init(shapes, num_steps)``: the initial state (a pytree) from the
    tapped inputs' ``jax.ShapeDtypeStruct``; ``update(state, step, inputs)``: the state after step ``step``
    (0-based, traced) given ``inputs`` = {tap: the activation that linear reads at this step}.
    """

    taps: tuple[str, ...]

    def init(self, shapes: dict[str, jax.ShapeDtypeStruct], num_steps: int) -> Any: ...

    def update(self, state: Any, step: jax.Array, inputs: dict[str, jax.Array]) -> Any: ...


def _default_forward() -> ForwardFn:
    from pqjax.models.flux import forward  # imported lazily: the models package imports nothing from here
    return forward


@functools.partial(jax.jit, static_argnames=("config", "forward_fn", "progress", "callback", "observer"))
def _denoise(config, params, latents, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
             timesteps, sigmas, guidance, *, forward_fn, progress, callback, observer):
    num_steps = timesteps.shape[0]
    batch = latents.shape[0]
    dtype = latents.dtype
    taps = frozenset(observer.taps) if observer is not None else frozenset()

    def velocity(x, i, tap=None):
        # FluxPipeline: timestep = t.expand(B).to(latents.dtype); transformer(timestep=timestep / 1000)
        timestep = jnp.broadcast_to(timesteps[i], (batch,)).astype(dtype) / 1000
        kw = {} if tap is None else {"tap": tap}
        return forward_fn(config, params, hidden_states=x, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                          txt_ids=txt_ids, guidance=guidance, **kw)

    def body(i, carry):
        x, state = carry
        if observer is None:
            v = velocity(x, i)
        else:
            seen = {}
            v = velocity(x, i, lambda name, a: seen.setdefault(name, a) if name in taps else None)
            state = observer.update(state, i, seen)
        x_new = euler_step(x, v, sigmas[i], sigmas[i + 1]).astype(dtype)
        # the latents' first element orders each report after the step's compute
        if progress:
            jax.debug.callback(progress_mod.report_step, i + 1, num_steps, x_new.reshape(-1)[0])
        if callback is not None:
            jax.debug.callback(lambda step, n, _: callback(int(step), int(n)), i + 1, num_steps, x_new.reshape(-1)[0])
        return x_new, state

    state = None
    if observer is not None:
        shapes = {}
        jax.eval_shape(lambda x: velocity(x, 0, lambda name, a: shapes.setdefault(
            name, jax.ShapeDtypeStruct(a.shape, a.dtype)) if name in taps else None), latents)
        missing = [t for t in observer.taps if t not in shapes]
        if missing:
            raise ValueError(f"the model never calls linears {missing} (observer taps)")
        state = observer.init(shapes, num_steps)
    x, state = jax.lax.fori_loop(0, num_steps, body, (latents, state))
    return x if observer is None else (x, state)


def denoise(config, params, latents, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
            timesteps, sigmas, guidance=None, *, forward_fn: ForwardFn | None = None,
            progress: bool = False, callback: Callable[[int, int], Any] | None = None,
            observer: Observer | None = None):
    """The jitted loop on prepared arrays (no checks): what :func:`sample` calls.

    ``timesteps [n]`` / ``sigmas [n+1]`` float32 (from :func:`flow_match_schedule`), ``guidance``
    ``[B]`` float32 or None. Useful to ``.lower()`` the whole sampler (e.g. for another platform).
    ``progress``: report each step to :func:`pqjax.progress.report_step` (open a :func:`pqjax.progress.steps`
    context around the call to see it). ``callback(step, num_steps)`` runs on the host after each step via
    ``jax.debug.callback``; it is a static argument (hashed by identity), so pass the same function object to avoid
    retracing. ``observer``: returns ``(latents, observer state)`` instead of the latents (see :class:`Observer`).
    """
    forward_fn = _default_forward() if forward_fn is None else forward_fn
    return _denoise(config, params, latents, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
                    timesteps, sigmas, guidance, forward_fn=forward_fn, progress=bool(progress),
                    callback=callback, observer=observer)


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def sample(config, params, *, latents, encoder_hidden_states, pooled_projections,
           num_inference_steps: int | None = None, guidance_scale: float = 3.5,
           scheduler_config: FlowMatchConfig = FlowMatchConfig(), forward_fn: ForwardFn | None = None,
           height: int | None = None, width: int | None = None, img_ids=None, txt_ids=None,
           sigmas=None, vae_scale_factor: int = VAE_SCALE_FACTOR, progress: bool = False,
           callback: Callable[[int, int], Any] | None = None, observer: Observer | None = None):
    """Denoise packed FLUX latents; returns the final packed latents ``[B, N_img, C*4]`` (with an ``observer``:
    ``(latents, observer state)``).

    Args:
      config, params: a ``FluxConfig`` and its params pytree (float or quantized).
      latents: initial packed noise ``[B, N_img, in_channels]`` (what FluxPipeline's ``latents=`` takes;
        see :func:`pqjax.pipeline.pack_latents`). The loop runs in ``latents.dtype``.
      encoder_hidden_states: T5 prompt embeddings ``[B, N_txt, joint_attention_dim]``.
      pooled_projections: pooled CLIP embeddings ``[B, pooled_projection_dim]``.
      num_inference_steps: number of Euler steps (may be omitted when ``sigmas`` is given).
      guidance_scale: embedded guidance, used only if ``config.guidance_embeds`` (FLUX.1-dev).
      scheduler_config: :class:`FlowMatchConfig` (FLUX.1-dev defaults; ``FlowMatchConfig.flux_schnell()``
        or ``FlowMatchConfig.from_diffusers_config(...)`` for others).
      forward_fn: the transformer, ``pqjax.models.flux.forward`` by default.
      height, width: image size in pixels (multiples of ``2 * vae_scale_factor``); give these or ``img_ids``.
      img_ids: ``[N_img, 3]`` position ids (default: :func:`prepare_img_ids` from height/width).
      txt_ids: ``[N_txt, 3]`` (default zeros).
      sigmas: custom un-shifted sigmas (FluxPipeline's ``sigmas=``); default ``linspace(1, 1/n, n)``.
      progress: a progress bar of the steps on a terminal (from inside the jitted loop) and a summary line
        on the ``pqjax`` logger: step 1 with compilation, then steady-state s/step.
      callback: ``callback(step, num_steps)`` on the host after each step (static: reuse one object).
      observer: sees tapped linear inputs at every step (:class:`Observer`; calibration uses it).
    """
    lat_shape = _shape(latents)
    if len(lat_shape) != 3:
        raise ValueError(f"latents must be packed [B, N_img, C*4] (use pack_latents on [B, C, H, W]), "
                         f"got shape {lat_shape}")
    batch, n_img, ch = lat_shape
    if ch != config.in_channels:
        raise ValueError(f"latents have {ch} channels in their last axis but the transformer expects "
                         f"config.in_channels={config.in_channels} (packed = 4 x the VAE's latent channels)")
    if config.out_dim != ch:
        raise ValueError(f"the transformer outputs {config.out_dim} channels but latents have {ch}: the Euler "
                         "update needs out_channels == in_channels")
    if not jnp.issubdtype(jnp.asarray(latents).dtype, jnp.floating):
        raise ValueError(f"latents must be floating point, got {jnp.asarray(latents).dtype}")

    n_text = check_text_inputs(config, encoder_hidden_states, pooled_projections)
    if n_text != batch:
        raise ValueError(f"batch sizes differ: latents {batch}, text embeddings {n_text}")
    n_txt = _shape(encoder_hidden_states)[1]

    if (height is None) != (width is None):
        raise ValueError("give both height= and width= (image size in pixels), or neither")
    if height is not None:
        h_lat, w_lat = latent_size(height, width, vae_scale_factor)
        if (h_lat // 2) * (w_lat // 2) != n_img:
            raise ValueError(f"latents have {n_img} image tokens but a {height}x{width} image has "
                             f"{(h_lat // 2) * (w_lat // 2)} ({h_lat // 2}x{w_lat // 2} packed 2x2 latent patches)")
    if img_ids is None:
        if height is None:
            raise ValueError("give the image size (height=, width= in pixels) or img_ids= so that the image "
                             "tokens get their 2-D positions")
        img_ids = prepare_img_ids(h_lat // 2, w_lat // 2)
    elif _shape(img_ids) != (n_img, 3):
        raise ValueError(f"img_ids must be [N_img={n_img}, 3], got shape {_shape(img_ids)}")
    img_ids = jnp.asarray(img_ids, jnp.float32)
    if txt_ids is None:
        txt_ids = prepare_txt_ids(n_txt)
    elif _shape(txt_ids) != (n_txt, 3):
        raise ValueError(f"txt_ids must be [N_txt={n_txt}, 3], got shape {_shape(txt_ids)}")
    txt_ids = jnp.asarray(txt_ids, jnp.float32)

    if sigmas is not None and num_inference_steps is not None and len(sigmas) != num_inference_steps:
        raise ValueError(f"len(sigmas)={len(sigmas)} != num_inference_steps={num_inference_steps}")
    if sigmas is None and num_inference_steps is None:
        raise ValueError("give num_inference_steps (or sigmas)")
    timesteps, sigmas = flow_match_schedule(num_inference_steps or len(sigmas), n_img, scheduler_config, sigmas)

    # FluxPipeline: guidance = torch.full([1], guidance_scale, float32).expand(B) if guidance_embeds else None
    guidance = jnp.full((batch,), guidance_scale, jnp.float32) if config.guidance_embeds else None

    args = (config, params, jnp.asarray(latents), jnp.asarray(encoder_hidden_states), jnp.asarray(pooled_projections),
            img_ids, txt_ids, jnp.asarray(timesteps), jnp.asarray(sigmas), guidance)
    kw = dict(forward_fn=forward_fn, progress=progress, callback=callback, observer=observer)
    if not progress or progress_mod.active() is not None:  # no bar, or the caller's (e.g. pqjax sample's)
        return denoise(*args, **kw)
    with progress_mod.steps("sample", log=log):
        return jax.block_until_ready(denoise(*args, **kw))
