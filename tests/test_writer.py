"""converters.save_diffusers: diffusers itself loads what we write, and computes what our forward computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from pqjax.models import flux, synthetic
from pqjax.models.flux import FluxConfig

from tolerances import flux_depth, flux_k, fp32_bound


@pytest.mark.parametrize("shard", [None, 300_000])
def test_written_folder_loads_in_diffusers_and_back(tmp_path, shard):
    from diffusers import FluxTransformer2DModel
    c = FluxConfig.tiny(num_layers=1, num_single_layers=1)
    params = synthetic.outlier_params(c, seed=3)
    folder = tmp_path / "model"
    converters.save_diffusers(folder, c, params, max_shard_bytes=shard)
    assert (folder / ("diffusion_pytorch_model.safetensors.index.json" if shard else
                      "diffusion_pytorch_model.safetensors")).exists()
    c2, back = converters.load_flux(folder, dtype=jnp.float32)
    assert c2 == c
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = FluxTransformer2DModel.from_pretrained(folder).eval()
    r = np.random.default_rng(0)
    hs, eh = r.standard_normal((1, 16, 64)).astype(np.float32), r.standard_normal((1, 5, 64)).astype(np.float32)
    pp = r.standard_normal((1, 64)).astype(np.float32)
    ids = np.stack([np.zeros(16), np.arange(16) // 4, np.arange(16) % 4], -1).astype(np.float32)
    t, g = np.array([0.4], np.float32), np.array([3.5], np.float32)
    with torch.no_grad():
        ref = model(hidden_states=torch.tensor(hs), encoder_hidden_states=torch.tensor(eh),
                    pooled_projections=torch.tensor(pp), timestep=torch.tensor(t), img_ids=torch.tensor(ids),
                    txt_ids=torch.zeros(5, 3), guidance=torch.tensor(g), return_dict=False)[0].numpy()
    out = np.asarray(flux.forward(c, back, hidden_states=hs, encoder_hidden_states=eh, pooled_projections=pp,
                                  timestep=t, img_ids=ids, txt_ids=np.zeros((5, 3), np.float32), guidance=g))
    assert np.abs(out - ref).max() / np.abs(ref).max() <= fp32_bound(flux_k(c.inner_dim, 16 + 5),
                                                                     flux_depth(c.num_layers, c.num_single_layers))


def test_refuses_to_overwrite_and_checks_shapes(tmp_path):
    c = FluxConfig.tiny(num_layers=1, num_single_layers=1)
    params = flux.init_params(c, jax.random.key(0))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        converters.save_diffusers(tmp_path / "exists", c, params)
    bad = dict(params, proj_out={"kernel": jnp.zeros((128, 32)), "bias": jnp.zeros(64)})
    with pytest.raises(ValueError, match="param proj_out.kernel has shape"):
        converters.save_diffusers(tmp_path / "bad", c, bad)
    assert not (tmp_path / "bad").exists()
