"""Pixel-space FLUX demo model: image<->latent mapping, text encoder, training (examples/demo_training.py),
sampling, save/load."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import demo_training as dt
from pqjax.demo import Tokenizer, make_dataset
from pqjax.demo import model as td
from pqjax.demo import text_encoder as te
from pqjax.models import flux
from pqjax.pipeline import pack_latents, prepare_img_ids, prepare_txt_ids

TRAIN = dt.TrainConfig(warmup_steps=5)
CFG = TRAIN.model
STEPS, BATCH = 30, 8


@pytest.fixture(scope="module")
def trained():
    losses = []
    state = dt.train(seed=0, steps=STEPS, batch=BATCH, config=TRAIN, losses=losses, verbose=False)
    return state, losses


def test_image_latent_exact_inverse_and_shapes():
    images, _, _ = make_dataset(4, seed=3)
    lat = td.image_to_latent(images)
    assert lat.shape == (4, td.CHANNELS, 16, 16) and lat.dtype == jnp.float32
    assert float(lat.min()) >= -1.0 and float(lat.max()) <= 1.0
    np.testing.assert_array_equal(td.latent_to_image(lat), images)
    # every uint8 value survives the round trip
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    x[0, :16, :16, 0] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(td.latent_to_image(td.image_to_latent(x)), x)
    # channel layout: latent channel c*4 + dy*2 + dx at (i, j) is pixel (2i+dy, 2j+dx) of channel c
    for c, dy, dx, i, j in ((2, 1, 0, 5, 6), (0, 0, 1, 15, 3), (1, 1, 1, 0, 15)):
        assert float(lat[1, c * 4 + dy * 2 + dx, i, j]) == pytest.approx(
            images[1, 2 * i + dy, 2 * j + dx, c] / 127.5 - 1)
    tokens = td.image_to_tokens(images)
    fc = CFG.flux
    assert tokens.shape == (4, 64, fc.in_channels) and fc.in_channels == 48
    assert fc.inner_dim > fc.in_channels  # the token must fit through the model width
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(pack_latents(lat)))
    np.testing.assert_array_equal(td.tokens_to_image(tokens), images)
    # every linear the default rules quantize has K a multiple of 64 (x_embedder, K = 48, stays float)
    from pqjax.config import DEFAULT_RULES, resolve_rules
    from pqjax.sites import get_path, linear_paths
    layout = flux.param_layout(fc)
    rule_of, _ = resolve_rules(linear_paths(layout), DEFAULT_RULES)
    quantized = [p for p, r in rule_of.items() if r.action != "keep"]
    assert len(quantized) > 10 and "x_embedder" not in quantized
    for p in quantized:
        assert get_path(layout, p)["kernel"][0] % 64 == 0, p


def test_forward_accepts_mapped_latents():
    state = dt.init(0, TRAIN)
    images, captions, _ = make_dataset(2, seed=1)
    b = dt.make_batch(images, captions, CFG.max_len)
    hidden, pooled = te.encode(state.params["text_encoder"], b["ids"], b["mask"], num_heads=CFG.text_heads)
    out = flux.forward(CFG.flux, state.params["transformer"], hidden_states=b["latents"],
                       encoder_hidden_states=hidden, pooled_projections=pooled, timestep=jnp.full((2,), 0.5),
                       img_ids=prepare_img_ids(8, 8), txt_ids=prepare_txt_ids(CFG.max_len))
    assert out.shape == b["latents"].shape and bool(jnp.all(jnp.isfinite(out)))


def test_text_encoder_shapes_and_mask():
    tcfg = te.TextEncoderConfig()
    assert tcfg.hidden_dim % 64 == 0 and tcfg.pooled_dim % 64 == 0
    params = dt.text_encoder_init(tcfg, jax.random.key(1))
    # perturb biases so that the test is not trivially passed by zero-initialised terms
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), params)
    tok = Tokenizer()
    caps = ["a red circle at the top", "a large blue square at the bottom and a small green triangle at the top"]
    ids, mask = tok.encode(caps, 16)
    hidden, pooled = te.encode(params, ids, mask)
    assert hidden.shape == (2, 16, tcfg.hidden_dim) and pooled.shape == (2, tcfg.pooled_dim)
    # more padding: same pooled output, same hidden states on real tokens
    ids2, mask2 = tok.encode(caps, 24)
    hidden2, pooled2 = te.encode(params, ids2, mask2)
    np.testing.assert_allclose(pooled2, pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.where(mask[..., None], hidden2[:, :16], 0), np.where(mask[..., None], hidden, 0),
                               rtol=1e-5, atol=1e-6)
    # garbage ids at masked positions change nothing that matters
    junk = np.where(mask, ids, 7)
    hidden3, pooled3 = te.encode(params, junk, mask)
    np.testing.assert_allclose(pooled3, pooled, rtol=1e-5, atol=1e-6)
    # but the real tokens do matter
    _, pooled4 = te.encode(params, *tok.encode(["a green circle at the top", caps[1]], 16))
    assert float(jnp.abs(pooled4[0] - pooled[0]).max()) > 1e-4
    np.testing.assert_allclose(pooled4[1], pooled[1], rtol=1e-5, atol=1e-6)


def test_text_encoder_save_load(tmp_path):
    tcfg = te.TextEncoderConfig(num_layers=1)
    params = dt.text_encoder_init(tcfg, jax.random.key(2))
    dt.save_text_encoder(tmp_path / "te", tcfg, params)
    cfg2, params2 = te.load(tmp_path / "te")
    assert cfg2 == tcfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_training_lowers_loss_and_is_reproducible(trained):
    state, losses = trained
    assert len(losses) == STEPS and int(state.step) == STEPS and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)
    again = []
    dt.train(seed=0, steps=STEPS, batch=BATCH, config=TRAIN, losses=again, verbose=False)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(losses))
    other = []
    dt.train(seed=1, steps=3, batch=BATCH, config=TRAIN, losses=other, verbose=False)
    assert other != losses[:3]


def test_text_encoder_is_trained_jointly(trained):
    state, _ = trained
    init = dt.init(0, TRAIN)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params["text_encoder"],
                         init.params["text_encoder"])
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_save_load_round_trip(trained, tmp_path):
    state, _ = trained
    dt.save(state, tmp_path / "model")
    assert (tmp_path / "model" / "transformer" / "config.json").exists()
    assert (tmp_path / "model" / "text_encoder" / "model.safetensors").exists()
    assert (tmp_path / "model" / "tokenizer" / "vocab.json").exists()
    loaded = td.load(tmp_path / "model")
    assert loaded.config == state.config.model and int(loaded.step) == STEPS
    assert jax.tree.structure(loaded.params) == jax.tree.structure(state.params)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, state.params)
    caps = ["a red circle at the top", "a small blue square at the bottom"]
    a = td.generate(state.model, caps, seed=5, steps=4)
    b = td.generate(loaded, caps, seed=5, steps=4)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, td.generate(state.model, caps, seed=6, steps=4))
    with pytest.raises(FileExistsError):
        dt.save(state, tmp_path / "model")


def test_config_is_multiple_of_64():
    c = td.DemoModelConfig().flux
    assert c.joint_attention_dim % 64 == 0 and c.pooled_projection_dim % 64 == 0
    assert c.inner_dim % 64 == 0 and not c.guidance_embeds
    with pytest.raises(ValueError):
        dataclasses.replace(td.DemoModelConfig(), max_len=8)
