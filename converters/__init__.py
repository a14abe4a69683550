"""FLUX checkpoints (diffusers folders, pipeline folders, BFL single files) -> pqjax params.

    config, params = converters.load_flux("path/to/FLUX.1-dev", dtype=jnp.bfloat16)

``params`` is a nested dict keyed by diffusers module names with Flax layouts (Linear ``kernel``
is ``[in, out]``, RMSNorm weights are ``scale``); see :mod:`pqjax.models.flux`.
"""
from . import bfl
from .bfl import diffusers_to_bfl
from .core import state_dict_layout
from .errors import ConversionError
from .loader import load_flux
from .writer import save_diffusers, to_state_dict
from .pipeline_components import (FluxPipelineComponents, LazyComponent, load_clip_text_encoder, load_flux_pipeline,
                                  load_t5_encoder, load_vae)

__all__ = ["load_flux", "save_diffusers", "to_state_dict", "ConversionError", "diffusers_to_bfl", "state_dict_layout", "bfl",
           "load_flux_pipeline", "FluxPipelineComponents", "LazyComponent", "load_clip_text_encoder",
           "load_t5_encoder", "load_vae"]
