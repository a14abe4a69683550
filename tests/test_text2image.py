"""Prompt -> image: converters.load_flux_pipeline + pqjax.pipeline vs diffusers' FluxPipeline, and `pqjax sample`.

The reference is a whole tiny FluxPipeline (tiny CLIP, T5, VAE, transformer; every parameter randomized) built
offline, saved with save_pretrained and run by diffusers (torch CPU, fp32) with pqjax's seed-derived latents passed
as ``latents=``. Images (output_type="np", [0, 1]) must match to 1e-4.
"""
from __future__ import annotations

import gc
import shutil
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import converters  # noqa: E402
from converters import ConversionError, load_flux_pipeline  # noqa: E402
from pqjax import cli  # noqa: E402
from pqjax.pipeline import (PromptEmbeddings, PromptTruncatedWarning, encode_prompts, prepare_latents,  # noqa: E402
                            text_to_image, to_pil)

from pipeline_fixtures import make_clip, make_pipeline  # noqa: E402
from tolerances import flux_depth, flux_k, fp32_bound, png_levels, text_encoder_depth, vae_depth  # noqa: E402

PROMPTS = ["a photo of a cat", "a red house by the river under the moon"]
LONG = "a big green tree " * 6   # > 77 CLIP tokens and > 32 T5 tokens with the letter-level tokenizers
RUN = dict(num_inference_steps=3, guidance_scale=3.5, height=64, width=96, max_sequence_length=32)
# the tiny pipeline (pipeline_fixtures): 2-layer CLIP / T5 (longest reduction 96 or the 77-token sequence), a
# 2 + 2-block FLUX transformer (inner 128) run for 3 steps, a 4-block VAE (widest 32 channels)
ENCODER_BOUND = fp32_bound(96, text_encoder_depth(2))
IMAGE_BOUND = fp32_bound(flux_k(128, 24 * 2 + 32), text_encoder_depth(2) + RUN["num_inference_steps"] * flux_depth(2, 2)
                         + vae_depth(4, 1))  # images in [0, 1]: relative to max |image| ~ absolute


def assert_same_png(a, b):
    """Two renderings of one image by fp32 computations with different rounding order: within the levels the fp32
    bound allows (one level: the bound is below 1/255)."""
    a, b = np.asarray(a, np.int32), np.asarray(b, np.int32)
    assert a.shape == b.shape and np.abs(a - b).max() <= png_levels(IMAGE_BOUND), np.abs(a - b).max()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe, path = make_pipeline(tmp_path_factory.mktemp("pipe"), seed=3)
    return pipe, path


def reference_images(pipe, prompts, latents):
    """diffusers' FluxPipeline with the same (packed) latents."""
    with torch.no_grad():
        return pipe(prompt=prompts, latents=torch.from_numpy(np.array(latents)), output_type="np", **RUN).images


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------------------
# Parity with FluxPipeline
# ------------------------------------------------------------------------------------------------

def test_encode_prompts_matches_flux_pipeline(tiny):
    """Embeddings equal FluxPipeline.encode_prompt, including a prompt truncated by both tokenizers (with warnings)."""
    pipe, path = tiny
    comps = load_flux_pipeline(path, jnp.float32)
    prompts = PROMPTS + [LONG]
    with torch.no_grad():
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = encode_prompts(comps, prompts, max_sequence_length=32, batch_size=2)  # chunks: 2 + 1 (padded)
    truncated = [str(w.message) for w in caught if w.category is PromptTruncatedWarning]
    assert len(truncated) == 2 and any("tokenizer_2" in m for m in truncated), truncated
    assert emb.prompts == prompts and emb.prompt_embeds.shape == (3, 32, 64) and emb.pooled_prompt_embeds.shape == (3, 64)
    e_t5, e_clip = rel_err(emb.prompt_embeds, ref_embeds.numpy()), rel_err(emb.pooled_prompt_embeds, ref_pooled.numpy())
    print(f"\n[encode_prompts] rel err T5 {e_t5:.2e}, CLIP pooled {e_clip:.2e}")
    assert e_t5 <= ENCODER_BOUND and e_clip <= ENCODER_BOUND


def test_images_match_flux_pipeline(tiny):
    pipe, path = tiny
    comps = load_flux_pipeline(path, jnp.float32)
    latents = prepare_latents(0, len(PROMPTS), RUN["height"], RUN["width"])
    ref = reference_images(pipe, PROMPTS, latents)
    ours = text_to_image(comps, PROMPTS, seed=0, **RUN)
    assert ours.shape == ref.shape == (2, 64, 96, 3) and ours.dtype == np.float32
    err = float(np.abs(ours - ref).max())
    print(f"\n[text_to_image] max abs err vs FluxPipeline {err:.2e} (images in [0, 1], std {ref.std():.2f})")
    assert err <= IMAGE_BOUND
    # sensitive: the images are not flat, and the prompt matters
    assert ref.std() > 0.05 and np.abs(ref[0] - ref[1]).max() > 0.05
    assert not comps.text_encoder.loaded and not comps.text_encoder_2.loaded  # released after encoding


def test_bf16_pipeline_tracks_fp32(tiny):
    """The default CLI dtype: encoders and transformer in bf16, VAE in fp32 (force_upcast). The bf16 transformer
    alone moves this tiny random model's latents by ~5% (see test_sampler); images stay close on average."""
    _, path = tiny
    comps = load_flux_pipeline(path, jnp.bfloat16)
    images = text_to_image(comps, PROMPTS, seed=0, **RUN)
    assert comps.vae.params["decoder"]["conv_in"]["kernel"].dtype == jnp.float32
    assert comps.transformer.params["x_embedder"]["kernel"].dtype == jnp.bfloat16
    ref = text_to_image(load_flux_pipeline(path, jnp.float32), PROMPTS, seed=0, **RUN)
    err, mean_err = float(np.abs(images - ref).max()), float(np.abs(images - ref).mean())
    print(f"\n[bf16 pipeline vs fp32] max abs err {err:.2e}, mean {mean_err:.2e}")
    assert images.dtype == np.float32 and mean_err < 2e-2 and err < 0.2


def test_quantized_or_other_transformer_goes_through_the_same_call(tiny):
    """transformer=(config, params) overrides the folder's transformer (how a quantized model is run)."""
    _, path = tiny
    comps = load_flux_pipeline(path, jnp.float32, components=[c for c in converters.pipeline_components.COMPONENTS
                                                             if c != "transformer"])
    assert comps.transformer is None
    config, params = converters.load_flux(f"{path}/transformer", jnp.float32)
    lat = text_to_image(comps, PROMPTS, transformer=(config, params), seed=0, output_type="latent", **RUN)
    full = load_flux_pipeline(path, jnp.float32)
    ref = text_to_image(full, PROMPTS, seed=0, output_type="latent", **RUN)
    np.testing.assert_array_equal(np.asarray(lat), np.asarray(ref))


# ------------------------------------------------------------------------------------------------
# Embeddings saved once, encoders released, seeds
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embeddings_save_load(tiny, tmp_path, dtype):
    _, path = tiny
    comps = load_flux_pipeline(path, jnp.float32)
    emb = encode_prompts(comps, PROMPTS, max_sequence_length=32).astype(dtype)
    emb.save(tmp_path / "emb.safetensors")
    back = PromptEmbeddings.load(tmp_path / "emb.safetensors")
    assert back.prompts == PROMPTS and back.prompt_embeds.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(back.prompt_embeds), np.asarray(emb.prompt_embeds))
    np.testing.assert_array_equal(np.asarray(back.pooled_prompt_embeds), np.asarray(emb.pooled_prompt_embeds))
    if dtype == "float32":  # the images from saved embeddings are the images from prompts; encoders never load
        fresh = load_flux_pipeline(path, jnp.float32)
        a = text_to_image(fresh, embeddings=back, seed=0, **RUN)
        assert not fresh.text_encoder.loaded and not fresh.text_encoder_2.loaded
        np.testing.assert_array_equal(a, text_to_image(comps, PROMPTS, seed=0, **RUN))
    with pytest.raises(ValueError, match="not a pqjax prompt-embeddings file"):
        PromptEmbeddings.load(f"{path}/vae/diffusion_pytorch_model.safetensors")


def test_text_encoders_released_before_transformer_loads(tiny):
    """Peak memory is max(encoders, transformer): no encoder weight is alive when the transformer is read."""
    _, path = tiny
    comps = load_flux_pipeline(path, jnp.float32)
    seen = {}
    refs = []
    load_text_encoder, load_t5, load_transformer = (comps.text_encoder._loader, comps.text_encoder_2._loader,
                                                    comps.transformer._loader)

    def tracked(loader):
        def load():
            params = loader()
            refs.extend(weakref.ref(x) for x in jax.tree.leaves(params))
            return params
        return load

    def checked_transformer_loader():
        gc.collect()
        seen["encoders_loaded"] = comps.text_encoder.loaded or comps.text_encoder_2.loaded
        seen["live_encoder_arrays"] = sum(r() is not None for r in refs)
        return load_transformer()

    comps.text_encoder._loader, comps.text_encoder_2._loader = tracked(load_text_encoder), tracked(load_t5)
    comps.transformer._loader = checked_transformer_loader
    text_to_image(comps, PROMPTS, seed=0, **RUN)
    assert len(refs) > 20 and seen == {"encoders_loaded": False, "live_encoder_arrays": 0}, seen


def test_seed_latents():
    """Image i's noise depends on (seed, index) only: batching does not change it."""
    a = prepare_latents(5, 3, 64, 96)
    assert a.shape == (3, 24, 64) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a[1:2]), np.asarray(prepare_latents(5, 1, 64, 96, first_index=1)))
    assert not np.allclose(np.asarray(a), np.asarray(prepare_latents(6, 3, 64, 96)))
    assert abs(float(a.std()) - 1) < 0.1 and prepare_latents(5, 1, 64, 96, dtype=jnp.bfloat16).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_pipeline_folders(tiny, tmp_path):
    _, path = tiny
    with pytest.raises(ConversionError, match="no model_index.json"):
        load_flux_pipeline(f"{path}/transformer")
    with pytest.raises(ConversionError, match="no such folder"):
        load_flux_pipeline(tmp_path / "nope")
    no_vae = shutil.copytree(path, tmp_path / "no_vae")
    shutil.rmtree(no_vae / "vae")
    shutil.rmtree(no_vae / "tokenizer_2")
    with pytest.raises(ConversionError, match=r"lacks the component folder\(s\) \['tokenizer_2', 'vae'\]"):
        load_flux_pipeline(no_vae)
    with pytest.raises(ConversionError, match="unknown pipeline components"):
        load_flux_pipeline(path, components=["unet"])
    # a CLIP encoder whose embedding table is smaller than its tokenizer's vocabulary
    small = shutil.copytree(path, tmp_path / "small_vocab")
    shutil.rmtree(small / "text_encoder")
    make_clip(0, vocab_size=20).save_pretrained(small / "text_encoder")
    with pytest.raises(ConversionError, match=r"tokenizer has 54 base tokens but .* embeds only 20"):
        load_flux_pipeline(small)
    # encoder widths that do not fit the transformer
    wide = shutil.copytree(path, tmp_path / "wide")
    shutil.rmtree(wide / "text_encoder")
    make_clip(0, hidden_size=32).save_pretrained(wide / "text_encoder")
    with pytest.raises(ConversionError, match="text_encoder hidden_size=32 does not match transformer "
                                              "pooled_projection_dim=64"):
        load_flux_pipeline(wide)


def test_bad_requests(tiny, tmp_path):
    _, path = tiny
    comps = load_flux_pipeline(path, jnp.float32)
    for h, w in ((50, 64), (64, 100)):
        with pytest.raises(ValueError, match="not divisible by 16"):
            text_to_image(comps, PROMPTS, height=h, width=w)
    assert not comps.text_encoder.loaded  # refused before any model ran
    with pytest.raises(ValueError, match="max_sequence_length must be in"):
        encode_prompts(comps, PROMPTS, max_sequence_length=513)
    with pytest.raises(ValueError, match="prompts must be"):
        encode_prompts(comps, [])
    with pytest.raises(ValueError, match="either prompts or embeddings"):
        text_to_image(comps)
    # added tokens beyond the encoder's embedding table: refused at encode time (JAX would clamp silently)
    extra = shutil.copytree(path, tmp_path / "extra_tokens")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(extra / "tokenizer_2")
    tok.add_tokens([f"<x{i}>" for i in range(8)])
    tok.save_pretrained(extra / "tokenizer_2")
    comps = load_flux_pipeline(extra, jnp.float32)
    with pytest.raises(ValueError, match=r"token id 62 .* only 60 entries"):
        encode_prompts(comps, ["a cat <x7>"], max_sequence_length=32)


# ------------------------------------------------------------------------------------------------
# `pqjax sample`
# ------------------------------------------------------------------------------------------------

def test_cli_sample_writes_the_pipeline_images(tiny, tmp_path, capsys):
    """Same images as text_to_image (PNG bytes of to_pil); --prompts FILE, --batch-size, --save-embeddings."""
    _, path = tiny
    flags = ["--steps", "3", "--height", "64", "--width", "96", "--max-sequence-length", "32", "--dtype", "float32"]
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    rc = cli.main(["sample", path, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "imgs"),
                   "--batch-size", "2", "--save-embeddings", str(tmp_path / "emb.safetensors"), *flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "pqjax sample: image 1-2/2: 3 steps, step 1 " in err  # progress: one summary line per batch
    written = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert written == ["0000.png", "0001.png"] and out.split() == [str(tmp_path / "imgs" / n) for n in written]
    from PIL import Image
    expected = to_pil(text_to_image(load_flux_pipeline(path, jnp.float32), PROMPTS, seed=0, **RUN))
    for name, exp, prompt in zip(written, expected, PROMPTS):
        png = Image.open(tmp_path / "imgs" / name)
        assert_same_png(png, exp)
        assert png.text["prompt"] == prompt and png.text["steps"] == "3" and png.text["seed"] == "0"
        assert png.text["model"] == path and png.text["method"] == "float" and png.text["size"] == "64x96"
    # the saved embeddings reproduce image 1 alone (index-derived seed), without the text encoders
    rc = cli.main(["sample", path, "--embeddings", str(tmp_path / "emb.safetensors"), "--out", str(tmp_path / "e"),
                   "--quiet", *flags])
    assert rc == 0
    assert_same_png(Image.open(tmp_path / "e" / "0001.png"), expected[1])


def test_cli_sample_errors(tiny, tmp_path, capsys):
    _, path = tiny
    base = ["--steps", "1", "--dtype", "float32", "--quiet"]
    cases = [
        (["sample", path, "--prompt", "a cat", "--height", "50", "--width", "64", "--out", "x.png"],
         "height=50 is not divisible by 16"),
        (["sample", str(tmp_path / "nope"), "--prompt", "a cat", "--out", "x.png"], "no such file or directory"),
        (["sample", f"{path}/vae", "--prompt", "a cat", "--out", "x.png"], "--components"),
        (["sample", path, "--prompts", str(tmp_path / "missing.txt"), "--out", "x"], "cannot read prompts file"),
        (["sample", path, "--embeddings", f"{path}/vae/diffusion_pytorch_model.safetensors", "--out", "x"],
         "not a pqjax prompt-embeddings file"),
    ]
    (tmp_path / "two.txt").write_text("a\nb\n")
    cases.append((["sample", path, "--prompts", str(tmp_path / "two.txt"), "--out", str(tmp_path / "one.png"),
                   "--height", "32", "--width", "32"], "single image file but there are 2 prompts"))
    for argv, msg in cases:
        assert cli.main(argv + base) == 1, argv
        err = capsys.readouterr().err
        assert msg in err and err.startswith("pqjax sample: error:"), (argv, err)
    with pytest.raises(SystemExit):  # usage error: a prompt source is required
        cli.main(["sample", path, "--out", "x.png"])


def test_cli_sample_pqjax_checkpoint(tiny, tmp_path, capsys):
    """MODEL = a pqjax checkpoint of the transformer + --components (the pipeline folder for the rest)."""
    from pqjax.io import checkpoint
    _, path = tiny
    config, params = converters.load_flux(f"{path}/transformer", jnp.float32)
    checkpoint.save(tmp_path / "ckpt", params, config)
    flags = ["--steps", "3", "--height", "64", "--width", "96", "--max-sequence-length", "32", "--dtype", "float32",
             "--quiet"]
    assert cli.main(["sample", str(tmp_path / "ckpt"), "--components", path, "--prompt", PROMPTS[0],
                     "--out", str(tmp_path / "a.png"), *flags]) == 0, capsys.readouterr().err
    assert cli.main(["sample", path, "--prompt", PROMPTS[0], "--out", str(tmp_path / "b.png"), *flags]) == 0
    from PIL import Image
    assert_same_png(Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png"))
