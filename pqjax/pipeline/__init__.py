"""Sampling for FLUX: flow-matching Euler scheduler, latent packing, the jitted denoising loop, and the whole
prompt -> image pipeline (tokenizers, text encoders, VAE decode)."""
from .latents import (VAE_SCALE_FACTOR, latent_size, pack_latents, packed_seq_len, prepare_img_ids, prepare_latents,
                      prepare_txt_ids, unpack_latents)
from .prompts import PromptEmbeddings, PromptTruncatedWarning, Tokenizer, check_text_inputs
from .sampler import Observer, denoise, sample
from .scheduler import (FlowMatchConfig, calculate_shift, euler_step, flow_match_schedule, flux_sigmas,
                        time_shift)
from .text2image import MAX_SEQUENCE_LENGTH, decode_images, encode_prompts, text_to_image, to_pil

__all__ = [
    "FlowMatchConfig", "calculate_shift", "time_shift", "flux_sigmas", "flow_match_schedule", "euler_step",
    "VAE_SCALE_FACTOR", "latent_size", "packed_seq_len", "pack_latents", "unpack_latents",
    "prepare_img_ids", "prepare_txt_ids", "prepare_latents",
    "sample", "denoise", "Observer",
    "Tokenizer", "PromptTruncatedWarning", "PromptEmbeddings", "check_text_inputs",
    "MAX_SEQUENCE_LENGTH", "encode_prompts", "prepare_latents", "decode_images", "text_to_image", "to_pil",
]
