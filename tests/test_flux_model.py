"""FLUX model: abstract shapes at full size, jit/dtype behaviour and input validation.

Output parity against diffusers lives in test_converters.py (it needs the converter)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax.models import flux
from pqjax.models.flux import FluxConfig

from tolerances import flux_depth, flux_k, fp32_bound


def _inputs(c: FluxConfig, B=1, n_img=16, n_txt=5, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_img, 3), np.float32)
    ids[:, 1], ids[:, 2] = np.arange(n_img) // 4, np.arange(n_img) % 4
    return dict(hidden_states=jnp.asarray(rng.standard_normal((B, n_img, c.in_channels)), dtype),
                encoder_hidden_states=jnp.asarray(rng.standard_normal((B, n_txt, c.joint_attention_dim)), dtype),
                pooled_projections=jnp.asarray(rng.standard_normal((B, c.pooled_projection_dim)), dtype),
                timestep=jnp.full((B,), 0.5, dtype), img_ids=jnp.asarray(ids), txt_ids=jnp.zeros((n_txt, 3)),
                guidance=jnp.full((B,), 3.5, dtype) if c.guidance_embeds else None)


def test_flux_dev_param_count_abstract():
    """eval_shape of a FLUX.1-dev-sized model and of its forward: ~11.9B parameters, nothing allocated."""
    c = FluxConfig.flux_dev()
    shapes = jax.eval_shape(lambda: flux.param_shapes(c))
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    # independent count from the published architecture: 19 double + 38 single blocks, D=3072
    D, mlp = 3072, 4 * 3072
    lin = lambda i, o: i * o + o
    double = 2 * lin(D, 6 * D) + 6 * lin(D, D) + 4 * 128 + 2 * lin(D, D) + 2 * (lin(D, mlp) + lin(mlp, D))
    single = lin(D, 3 * D) + 3 * lin(D, D) + 2 * 128 + lin(D, mlp) + lin(D + mlp, D)
    emb = lin(64, D) + lin(4096, D) + 2 * (lin(256, D) + lin(D, D)) + lin(768, D) + lin(D, D)
    expected = emb + 19 * double + 38 * single + lin(D, 2 * D) + lin(D, 64)
    assert n == expected
    assert 11.8e9 < n < 12.0e9
    out = jax.eval_shape(lambda p, kw: flux.forward(c, p, **kw), flux.param_shapes(c),
                         jax.eval_shape(lambda: _inputs(c, B=1, n_img=4096, n_txt=512, dtype=jnp.bfloat16)))
    assert out.shape == (1, 4096, 64) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_jit_matches_eager_and_dtype(dtype):
    c = FluxConfig.tiny(num_layers=1, num_single_layers=1)
    p = flux.init_params(c, jax.random.key(0), dtype=dtype)
    kw = _inputs(c, B=2, dtype=dtype)
    eager = flux.forward(c, p, **kw)
    jitted = jax.jit(lambda p, kw: flux.forward(c, p, **kw))(p, kw)
    assert eager.dtype == dtype and eager.shape == (2, 16, 64)
    e, j = np.asarray(eager, np.float32), np.asarray(jitted, np.float32)
    if dtype == jnp.float32:  # XLA fuses and reorders the compiled forward: fp32 rounding order only
        assert np.abs(e - j).max() / np.abs(j).max() <= fp32_bound(flux_k(c.inner_dim, 16 + 5), flux_depth(1, 1))
    else:
        np.testing.assert_allclose(e, j, rtol=0, atol=5e-2)


def test_forward_bad_inputs_name_the_argument():
    c = FluxConfig.tiny(num_layers=1, num_single_layers=1)
    p = flux.init_params(c, jax.random.key(0))
    kw = _inputs(c)
    with pytest.raises(ValueError, match="hidden_states must be"):
        flux.forward(c, p, **{**kw, "hidden_states": kw["hidden_states"][..., :32]})
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        flux.forward(c, p, **{**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :10]})
    with pytest.raises(ValueError, match="img_ids must be"):
        flux.forward(c, p, **{**kw, "img_ids": kw["img_ids"][:3]})
    with pytest.raises(ValueError, match="guidance` is required"):
        flux.forward(c, p, **{**kw, "guidance": None})


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig(attention_head_dim=64)
    assert FluxConfig.flux_dev().guidance_embeds and not FluxConfig.flux_schnell().guidance_embeds
    c = FluxConfig.tiny()
    assert FluxConfig.from_dict({**c.to_dict(), "_class_name": "FluxTransformer2DModel"}) == c
