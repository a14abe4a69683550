"""Shared test setup: fp32-exact matmuls, JAX's persistent compilation cache, examples/ importable (the demo
models' training code lives there)."""
import os
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))

jax.config.update("jax_default_matmul_precision", "highest")
_CACHE = os.environ.get("PQJAX_TEST_CACHE", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
