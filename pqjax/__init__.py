"""pqjax: PermuQuant post-training quantization (NVFP4 / INT W4A4) for diffusion transformers in JAX.

Data flow: ``converters.load_flux`` (convert) -> ``pqjax.calib`` (calibrate) -> ``pqjax.permute`` (search) ->
``pqjax.sites`` (absorb) -> ``pqjax.formats`` (pack) -> ``pqjax.models.flux.forward`` / ``pqjax.pipeline`` (run).
"""
__version__ = "0.1.0"

from pqjax import formats  # noqa: E402
from pqjax.calib import CalibBatch  # noqa: E402
from pqjax.config import DEFAULT_RULES, METHODS, QuantConfig, Rule  # noqa: E402
from pqjax.io import load, load_model, save  # noqa: E402
from pqjax.models.flux import FluxConfig  # noqa: E402
from pqjax.ptq import quantize  # noqa: E402
from pqjax.report import QuantReport  # noqa: E402

__all__ = ["__version__", "formats", "CalibBatch", "QuantConfig", "Rule", "DEFAULT_RULES", "METHODS", "FluxConfig",
           "QuantReport", "quantize", "save", "load", "load_model"]
