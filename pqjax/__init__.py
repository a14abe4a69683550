"""pqjax: PermuQuant post-training quantization for diffusion transformers in JAX."""
__version__ = "0.1.0"
