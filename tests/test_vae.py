"""The VAE (decoder and encoder) vs diffusers' AutoencoderKL (torch CPU, fp32) on tiny random models.

"flux": FLUX.1's structure (no quant convs, mid-block attention, scaling_factor 0.3611 / shift_factor 0.1159) with
channel changes between blocks (so every conv_shortcut is exercised). "sd": SD-style quant/post-quant convs, two
resnets per block, no mid-block attention. Every parameter randomized; <= 1e-5 relative error.
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from converters import ConversionError, load_vae  # noqa: E402
from pqjax.models import vae  # noqa: E402

from pipeline_fixtures import make_vae  # noqa: E402
from tolerances import fp32_bound, vae_depth  # noqa: E402


def vae_bound(config) -> float:
    """fp32 bound for a whole encode or decode: 3x3 convolutions over the widest block are the longest dots."""
    return fp32_bound(9 * max(config.block_out_channels), vae_depth(len(config.block_out_channels),
                                                                   config.layers_per_block))

VARIANTS = {
    "flux": dict(),
    "sd": dict(use_quant_conv=True, layers_per_block=2, mid_block_add_attention=False, block_out_channels=(8, 16),
               scaling_factor=0.18215, shift_factor=None),
}
decode = jax.jit(vae.decode, static_argnums=0)
encode = jax.jit(vae.encode, static_argnums=0)


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        model = make_vae(7, **kw)
        path = tmp_path_factory.mktemp("vae") / name
        model.save_pretrained(path)
        config, params = load_vae(path, jnp.float32)
        out[name] = (name, model, config, params, path)
    return out


@pytest.fixture(params=list(VARIANTS))
def tiny_vae(request, vaes):
    return vaes[request.param]


def test_config_from_folder(tiny_vae):
    name, model, config, _, _ = tiny_vae
    assert config.scale_factor == 2 ** (len(model.config.block_out_channels) - 1)
    assert config.scaling_factor == model.config.scaling_factor and config.shift_factor == model.config.shift_factor
    assert config.use_quant_conv == (name == "sd")
    assert vae.VAEConfig() == vae.VAEConfig.from_dict(dict(  # FLUX.1-dev's vae/config.json
        _class_name="AutoencoderKL", block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024))


def test_decoder_matches_diffusers(tiny_vae):
    name, model, config, params, _ = tiny_vae
    z = np.random.default_rng(1).standard_normal((2, 16, 6, 10)).astype(np.float32)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(z)).sample.numpy()
    ours = decode(config, params, jnp.asarray(z))
    assert ours.shape == ref.shape == (2, 3, 6 * config.scale_factor, 10 * config.scale_factor)
    err = rel_err(ours, ref)
    print(f"\n[vae {name}] decode rel err {err:.2e}")
    assert err <= vae_bound(config)


def test_encoder_matches_diffusers(tiny_vae):
    name, model, config, params, _ = tiny_vae
    f = config.scale_factor
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 6 * f, 10 * f)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = encode(config, params, jnp.asarray(x))
    e_m, e_v = rel_err(mean, dist.mean.numpy()), rel_err(logvar, dist.logvar.numpy())
    print(f"\n[vae {name}] encode rel err mean {e_m:.2e}, logvar {e_v:.2e}")
    assert e_m <= vae_bound(config) and e_v <= vae_bound(config)


def test_flux_scaling_and_shift(tiny_vae):
    """decode_latents / encode_image apply FLUX's latent scaling exactly as FluxPipeline / Flux img2img do."""
    name, model, config, params, _ = tiny_vae
    f = config.scale_factor
    rng = np.random.default_rng(3)
    lat = rng.standard_normal((1, 16, 4, 6)).astype(np.float32)
    shift = model.config.shift_factor or 0.0
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(lat) / model.config.scaling_factor + shift).sample.numpy()
    assert rel_err(jax.jit(vae.decode_latents, static_argnums=0)(config, params, jnp.asarray(lat)), ref) <= vae_bound(config)
    x = rng.uniform(-1, 1, (1, 3, 4 * f, 6 * f)).astype(np.float32)
    with torch.no_grad():
        mode = model.encode(torch.from_numpy(x)).latent_dist.mode()
    ref_z = ((mode - shift) * model.config.scaling_factor).numpy()
    enc_image = jax.jit(vae.encode_image, static_argnums=0)
    assert rel_err(enc_image(config, params, jnp.asarray(x)), ref_z) <= vae_bound(config)


def test_bf16_decode_tracks_fp32(vaes):
    _, _, config, params, path = vaes["flux"]
    _, p16 = load_vae(path, jnp.bfloat16)
    z = jnp.asarray(np.random.default_rng(4).standard_normal((1, 16, 4, 4)), jnp.float32)
    out = decode(config, p16, z)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, np.asarray(decode(config, params, z))) < 5e-2


def test_bad_inputs(vaes, tmp_path):
    _, _, config, params, path = vaes["flux"]
    with pytest.raises(ValueError, match=r"z must be \[B, 16, h, w\]"):
        vae.decode(config, params, jnp.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(config, params, jnp.zeros((1, 3, 20, 16)))
    with pytest.raises(ValueError, match=r"image must be \[B, 3, H, W\]"):
        vae.encode(config, params, jnp.zeros((1, 16, 16, 3)))  # NHWC by mistake
    cfg = json.loads((path / "config.json").read_text())
    for i, (change, msg) in enumerate([({"up_block_types": ["AttnUpDecoderBlock2D"] * 4}, "up_block_types"),
                        ({"latents_mean": [0.0] * 16}, "latents_mean"),
                        ({"_class_name": "AutoencoderTiny"}, "expected one of"),
                        ({"block_out_channels": [8, 16, 32, 64]}, r"missing keys \(4\): .*conv_shortcut"),
                        ({"layers_per_block": 0}, r"unexpected keys"),
                        ({"block_out_channels": [8, 16, 32, 32], "latent_channels": 4}, "shape mismatch")]):
        bad = shutil.copytree(path, tmp_path / f"bad{i}")
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ConversionError, match=msg):
            load_vae(bad)
