"""Flow-matching Euler scheduler, exactly as diffusers' ``FluxPipeline`` drives
``FlowMatchEulerDiscreteScheduler``.

The schedule is computed on the host in numpy (float32, same operation order as diffusers), so the
sigmas/timesteps match diffusers' bit for bit; the per-step Euler update :func:`euler_step` is a
pure JAX function used inside the jitted sampling loop.

FluxPipeline's recipe for ``num_inference_steps = n``::

    sigmas = np.linspace(1.0, 1 / n, n)                       # float64, then float32 in the scheduler
    mu     = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
    sigmas = time_shift(mu, 1.0, sigmas)   if use_dynamic_shifting   (FLUX.1-dev)
             shift * s / (1 + (shift - 1) * s)   otherwise           (FLUX.1-schnell, shift=1)
    timesteps = sigmas * 1000 ; sigmas = concat(sigmas, [0])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

__all__ = [
    "FlowMatchConfig",
    "calculate_shift",
    "time_shift",
    "flux_sigmas",
    "flow_match_schedule",
    "euler_step",
]


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """The ``FlowMatchEulerDiscreteScheduler`` config fields that FLUX uses (FLUX.1-dev defaults).

    FLUX.1-dev's ``scheduler/scheduler_config.json`` is ``shift=3.0, use_dynamic_shifting=True,
    base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15``
    (with dynamic shifting on, ``shift`` is unused). FLUX.1-schnell uses
    ``use_dynamic_shifting=False, shift=1.0``: see :meth:`flux_schnell`.
    """

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"FlowMatchConfig: time_shift_type must be 'exponential' or 'linear', "
                             f"got {self.time_shift_type!r}")

    @classmethod
    def flux_dev(cls) -> "FlowMatchConfig":
        return cls()

    @classmethod
    def flux_schnell(cls) -> "FlowMatchConfig":
        return cls(shift=1.0, use_dynamic_shifting=False)

    # Options of FlowMatchEulerDiscreteScheduler that change the schedule but that we do not implement.
    _UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                    "stochastic_sampling", "use_flow_sigmas")

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "FlowMatchConfig":
        """From a diffusers ``scheduler_config.json`` dict (or ``scheduler.config``).

        Keys missing from ``config`` take diffusers' *scheduler class* defaults (not FLUX's), exactly
        as ``FlowMatchEulerDiscreteScheduler.from_config`` would; except the ``base/max`` seq-len and
        shift keys, which FluxPipeline reads with ``config.get(key, default)`` using the same values.
        Unknown keys (``_class_name``, ``_diffusers_version``...) are ignored.
        """
        config = dict(config)
        bad = [k for k in cls._UNSUPPORTED if config.get(k)]
        if bad:
            raise ValueError(f"FlowMatchConfig.from_diffusers_config: unsupported scheduler options {bad} "
                             "(only the plain/shifted flow-match Euler schedule FLUX uses is implemented)")
        # diffusers' FlowMatchEulerDiscreteScheduler.__init__ defaults
        out = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                   max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                   time_shift_type="exponential", shift_terminal=None)
        for k in out:
            if k in config and config[k] is not None:
                out[k] = config[k]
        out["num_train_timesteps"] = int(out["num_train_timesteps"])
        out["base_image_seq_len"] = int(out["base_image_seq_len"])
        out["max_image_seq_len"] = int(out["max_image_seq_len"])
        for k in ("shift", "base_shift", "max_shift"):
            out[k] = float(out[k])
        out["use_dynamic_shifting"] = bool(out["use_dynamic_shifting"])
        return cls(**out)

    def to_diffusers_config(self) -> dict:
        """The kwargs for ``FlowMatchEulerDiscreteScheduler(**...)`` (handy for parity tests)."""
        return dataclasses.asdict(self)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent ``mu``: linear in the packed image sequence length (FluxPipeline)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigma: float, t: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """``exp(mu) / (exp(mu) + (1/t - 1)**sigma)`` (``kind="linear"``: ``mu / (mu + (1/t - 1)**sigma)``)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** sigma)
    raise ValueError(f"time_shift: kind must be 'exponential' or 'linear', got {kind!r}")


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """FluxPipeline's default un-shifted sigmas: ``np.linspace(1.0, 1/n, n)`` (float64)."""
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    return np.linspace(1.0, 1 / n, n)


def flow_match_schedule(num_inference_steps: int, image_seq_len: int,
                        config: FlowMatchConfig = FlowMatchConfig(),
                        sigmas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps [n] float32, sigmas [n+1] float32)`` as FluxPipeline + the scheduler compute them.

    ``sigmas`` overrides FluxPipeline's default ``linspace(1, 1/n, n)`` (like the pipeline's
    ``sigmas=`` argument); they still go through the (dynamic or static) shift. ``image_seq_len``
    is the packed latent length ``(H/16) * (W/16)``; it only matters with dynamic shifting.
    """
    if sigmas is None:
        sigmas = flux_sigmas(num_inference_steps)
    sigmas = np.asarray(sigmas).astype(np.float32)
    if sigmas.ndim != 1 or sigmas.size < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D array, got shape {sigmas.shape}")
    c = config
    if c.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sigmas = time_shift(mu, 1.0, sigmas, c.time_shift_type)
    else:
        sigmas = c.shift * sigmas / (1 + (c.shift - 1) * sigmas)
    if c.shift_terminal:
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - c.shift_terminal)
        sigmas = 1 - (one_minus_z / scale_factor)
    sigmas = np.asarray(sigmas, dtype=np.float32)
    # diffusers: torch float32 sigmas * num_train_timesteps (a float32 product, same as numpy's here)
    timesteps = (sigmas * np.float32(c.num_train_timesteps)).astype(np.float32)
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    return timesteps, sigmas


def euler_step(sample: jnp.ndarray, model_output: jnp.ndarray, sigma, sigma_next) -> jnp.ndarray:
    """``FlowMatchEulerDiscreteScheduler.step``: ``sample + (sigma_next - sigma) * model_output``.

    Same dtype handling as diffusers: ``sample`` is upcast to float32; ``dt`` is a float32 scalar
    tensor, which torch's promotion rules cast to the model output's dtype before the product (a
    0-dim tensor does not promote a dimensioned one); the sum is float32; the result is cast back
    to ``model_output.dtype``.
    """
    dt = (jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)).astype(model_output.dtype)
    update = dt * model_output
    prev = sample.astype(jnp.float32) + update.astype(jnp.float32)
    return prev.astype(model_output.dtype)
