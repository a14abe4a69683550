"""pqjax: PermuQuant post-training quantization (NVFP4 / INT W4A4) for diffusion transformers in JAX.

Data flow: ``converters.load_flux`` (convert) -> ``pqjax.calib`` (calibrate) -> ``pqjax.permute`` (search) ->
``pqjax.sites`` (absorb) -> ``pqjax.formats`` (pack) -> ``pqjax.models.flux.forward`` / ``pqjax.pipeline`` (run).
"""
from pqjax.version import __version__

from pqjax import formats
from pqjax.calib import CalibBatch
from pqjax.config import DEFAULT_RULES, METHODS, QuantConfig, Rule
from pqjax.io import load, save
from pqjax.loading import load_model
from pqjax.models.flux import FluxConfig
from pqjax.ptq import quantize
from pqjax.report import QuantReport
from pqjax.site_quant import SiteQuant, SiteQuantConfig, quantize_site

__all__ = ["__version__", "formats", "CalibBatch", "QuantConfig", "Rule", "DEFAULT_RULES", "METHODS", "FluxConfig",
           "QuantReport", "quantize", "save", "load", "load_model",
           "quantize_site", "SiteQuant", "SiteQuantConfig"]
