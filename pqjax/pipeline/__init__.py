"""Sampling for FLUX: flow-matching Euler scheduler, latent packing, and the jitted denoising loop."""
from .latents import (VAE_SCALE_FACTOR, latent_size, pack_latents, packed_seq_len, prepare_img_ids,
                      prepare_txt_ids, unpack_latents)
from .sampler import denoise, sample
from .scheduler import (FlowMatchConfig, calculate_shift, euler_step, flow_match_schedule, flux_sigmas,
                        time_shift)

__all__ = [
    "FlowMatchConfig", "calculate_shift", "time_shift", "flux_sigmas", "flow_match_schedule", "euler_step",
    "VAE_SCALE_FACTOR", "latent_size", "packed_seq_len", "pack_latents", "unpack_latents",
    "prepare_img_ids", "prepare_txt_ids",
    "sample", "denoise",
]
