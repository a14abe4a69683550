"""FLUX checkpoints (diffusers folders, pipeline folders, BFL single files) -> pqjax params.

    config, params = converters.load_flux("path/to/FLUX.1-dev", dtype=jnp.bfloat16)

``params`` is a nested dict keyed by diffusers module names with Flax layouts (Linear ``kernel``
is ``[in, out]``, RMSNorm weights are ``scale``); see :mod:`pqjax.models.flux`.
"""
from . import bfl, safetensors_io
from .bfl import diffusers_to_bfl
from .core import state_dict_layout
from .errors import ConversionError
from .loader import load_flux

__all__ = ["load_flux", "ConversionError", "diffusers_to_bfl", "state_dict_layout", "bfl", "safetensors_io"]
