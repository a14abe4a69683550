"""CLIP and T5 text encoders and the tokenizers vs transformers (torch CPU, fp32) on tiny random models.

Every torch parameter is randomized (pipeline_fixtures.randomize_), the models are saved with save_pretrained (and
rewritten in the older layouts real FLUX folders use) and loaded by our converters; outputs are compared on fresh
random token ids: <= 1e-5 relative (max abs error / max abs reference).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from converters import ConversionError, load_clip_text_encoder, load_t5_encoder  # noqa: E402
from pqjax.models import clip, t5  # noqa: E402
from pqjax.pipeline import PromptTruncatedWarning, Tokenizer  # noqa: E402

from tolerances import fp32_bound, text_encoder_depth  # noqa: E402
from pipeline_fixtures import (CLIP_VOCAB_SIZE, T5_VOCAB_SIZE, make_clip, make_clip_tokenizer, make_t5,  # noqa: E402
                               make_t5_tokenizer)

clip_forward = jax.jit(clip.forward, static_argnums=0)
t5_forward = jax.jit(t5.forward, static_argnums=0)


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def rewrite_weights(src: str, dst: str, rename, weights="model.safetensors"):
    """Copy a saved transformers folder, renaming tensors (the layouts older transformers versions wrote)."""
    shutil.copytree(src, dst)
    sd = load_file(os.path.join(src, weights))
    save_file({rename(k): v for k, v in sd.items() if rename(k) is not None}, os.path.join(dst, weights))
    return dst


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """"v5": transformers 5's layout, first-EOS pooling. "flux1": FLUX.1's files ("text_model." prefix, a
    position_ids buffer) with the legacy eos_token_id=2 (pooling at argmax(ids)) and exact GELU."""
    root = tmp_path_factory.mktemp("clip")
    out = {}
    m = make_clip(0)
    m.save_pretrained(root / "v5")
    out["v5"] = (m, str(root / "v5"))
    legacy = make_clip(1, eos_token_id=2, hidden_act="gelu", num_hidden_layers=1)
    legacy.save_pretrained(root / "tmp")
    path = rewrite_weights(str(root / "tmp"), str(root / "flux1"), lambda k: "text_model." + k)
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(sd, os.path.join(path, "model.safetensors"))
    out["flux1"] = (legacy, path)
    return out


def clip_ids(rng, batch: int, eos: int, length: int = 77) -> np.ndarray:
    """Random prompts: BOS, words, EOS at varying positions, then EOS as padding (CLIP's pad token)."""
    ids = rng.integers(2, CLIP_VOCAB_SIZE - 1, (batch, length))
    ids[:, 0] = 0
    for b, end in enumerate(rng.integers(1, length, batch)):
        ids[b, end:] = eos
    return ids


@pytest.mark.parametrize("variant", ["v5", "flux1"])
def test_clip_matches_transformers(clips, variant):
    model, path = clips[variant]
    config, params = load_clip_text_encoder(path, jnp.float32)
    assert config == clip.CLIPTextConfig.from_dict(model.config.to_dict())
    eos = CLIP_VOCAB_SIZE - 1 if config.eos_token_id == 2 else config.eos_token_id  # legacy: EOS is the top id
    ids = clip_ids(np.random.default_rng(1), 3, eos)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))
    hidden, pooled = clip_forward(config, params, jnp.asarray(ids))
    e_h, e_p = rel_err(hidden, ref.last_hidden_state.numpy()), rel_err(pooled, ref.pooler_output.numpy())
    print(f"\n[clip {variant}] rel err hidden {e_h:.2e}, pooled {e_p:.2e}")
    bound = fp32_bound(max(config.intermediate_size, 77), text_encoder_depth(config.num_hidden_layers))
    assert e_h <= bound and e_p <= bound
    # the pooled state really is taken at a per-row position (not a fixed one)
    assert not np.allclose(np.asarray(pooled), np.asarray(hidden)[:, -1], atol=1e-3)


def test_clip_bf16_tracks_fp32(clips):
    model, path = clips["v5"]
    config, p32 = load_clip_text_encoder(path, jnp.float32)
    _, p16 = load_clip_text_encoder(path, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    ids = jnp.asarray(clip_ids(np.random.default_rng(2), 2, config.eos_token_id))
    ref = np.asarray(clip_forward(config, p32, ids)[1])
    out = clip_forward(config, p16, ids)[1]
    assert out.dtype == jnp.bfloat16 and rel_err(out, ref) < 3e-2


# ------------------------------------------------------------------------------------------------
# T5
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5s(tmp_path_factory):
    """"gated": T5 v1.1 (gated-gelu) as transformers 5 saves it (shared.weight only), sharded.
    "relu": original-T5 FFN stored the older way (encoder.embed_tokens.weight only, like FLUX.1's files)."""
    root = tmp_path_factory.mktemp("t5")
    out = {}
    m = make_t5(2)
    m.save_pretrained(root / "gated", max_shard_size="50KB")
    assert os.path.isfile(root / "gated" / "model.safetensors.index.json")
    out["gated"] = (m, str(root / "gated"))
    relu = make_t5(3, feed_forward_proj="relu", num_layers=1)
    relu.save_pretrained(root / "tmp")
    path = rewrite_weights(str(root / "tmp"), str(root / "relu"),
                           lambda k: "encoder.embed_tokens.weight" if k == "shared.weight" else k)
    out["relu"] = (relu, path)
    return out


@pytest.mark.parametrize("variant,length", [("gated", 300), ("relu", 40)])
def test_t5_matches_transformers(t5s, variant, length):
    """300 tokens exercise every relative-position bucket (exact, log-spaced and clamped beyond max_distance)."""
    model, path = t5s[variant]
    config, params = load_t5_encoder(path, jnp.float32)
    assert config.is_gated_act == (variant == "gated")
    ids = np.random.default_rng(3).integers(0, T5_VOCAB_SIZE, (2, length))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))[0].numpy()
    err = rel_err(t5_forward(config, params, jnp.asarray(ids)), ref)
    print(f"\n[t5 {variant} L={length}] rel err {err:.2e}")
    assert err <= fp32_bound(max(config.d_ff, length), text_encoder_depth(config.num_layers))


def test_t5_bf16_tracks_fp32(t5s):
    _, path = t5s["gated"]
    config, p32 = load_t5_encoder(path, jnp.float32)
    _, p16 = load_t5_encoder(path, jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, T5_VOCAB_SIZE, (1, 40)))
    out = t5_forward(config, p16, ids)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, np.asarray(t5_forward(config, p32, ids))) < 5e-2


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 32), (64, 256)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    L = 600
    pos = torch.arange(L)
    ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=True,
                                                num_buckets=num_buckets, max_distance=max_distance).numpy()
    np.testing.assert_array_equal(t5.relative_position_buckets(L, num_buckets, max_distance), ref)


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------

PROMPTS = ["a photo of a cat", "A Red House, by the river!", "", "sky " * 30]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    ref = {"clip": make_clip_tokenizer(), "t5": make_t5_tokenizer()}
    for name, tok in ref.items():
        tok.save_pretrained(root / name)
    return {name: (tok, str(root / name)) for name, tok in ref.items()}


@pytest.mark.parametrize("name,max_length", [("clip", 77), ("clip", 24), ("t5", 512), ("t5", 24)])
@pytest.mark.parametrize("backend", ["transformers", "tokenizers"])
def test_tokenizer_matches_flux_pipeline_call(tokenizer_folders, name, max_length, backend):
    """Ids equal FluxPipeline's own tokenizer call (padding to max_length, truncation) with either backend;
    prompts longer than max_length warn, naming the dropped text."""
    ref_tok, folder = tokenizer_folders[name]
    tok = Tokenizer.from_folder(folder, backend=backend)
    assert tok.kind == backend and tok.vocab_size == ref_tok.vocab_size
    if name == "clip":
        assert tok.model_max_length == 77
    ref = ref_tok(PROMPTS, padding="max_length", max_length=max_length, truncation=True).input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok(PROMPTS, max_length)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ids, np.asarray(ref))
    long = [i for i, p in enumerate(PROMPTS) if len(ref_tok(p).input_ids) > max_length]
    msgs = [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(msgs) == len(long) == (1 if max_length < 100 else 0)
    assert all("truncated" in m and "sky" in m for m in msgs)


def test_tokenizer_bad_folders(tmp_path, tokenizer_folders):
    with pytest.raises(ValueError, match="no such tokenizer folder"):
        Tokenizer.from_folder(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        Tokenizer.from_folder(empty)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_folder(empty, backend="tokenizers")
    _, folder = tokenizer_folders["clip"]
    with pytest.raises(ValueError, match="prompts must be"):
        Tokenizer.from_folder(folder)([], 77)


# ------------------------------------------------------------------------------------------------
# Converter errors
# ------------------------------------------------------------------------------------------------

def test_encoder_converters_reject_bad_folders(tmp_path, clips, t5s):
    _, clip_path = clips["v5"]
    with pytest.raises(ConversionError, match="no such folder"):
        load_clip_text_encoder(tmp_path / "missing")
    no_cfg = shutil.copytree(clip_path, tmp_path / "no_cfg")
    os.remove(no_cfg / "config.json")
    with pytest.raises(ConversionError, match="no config.json"):
        load_clip_text_encoder(no_cfg)
    no_w = shutil.copytree(clip_path, tmp_path / "no_w")
    os.remove(no_w / "model.safetensors")
    with pytest.raises(ConversionError, match="no weights"):
        load_clip_text_encoder(no_w)
    # a config that does not describe the weights: shapes are checked before anything is read
    wide = shutil.copytree(clip_path, tmp_path / "wide")
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ConversionError, match=r"shape mismatch.*fc1.*\(96, 64\), expected \(128, 64\)"):
        load_clip_text_encoder(wide)
    deep = shutil.copytree(clip_path, tmp_path / "deep")
    (deep / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match=r"missing keys .*encoder\.layers\.2\."):
        load_clip_text_encoder(deep)
    # a T5 folder is not a CLIP folder
    _, t5_path = t5s["relu"]
    with pytest.raises(ConversionError, match="expected one of"):
        load_clip_text_encoder(t5_path)
    extra = rewrite_weights(t5_path, str(tmp_path / "extra"), lambda k: k)
    sd = load_file(os.path.join(extra, "model.safetensors"))
    sd["encoder.block.0.layer.1.DenseReluDense.wi_2.weight"] = np.zeros((96, 64), np.float32)
    save_file(sd, os.path.join(extra, "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\).*wi_2"):
        load_t5_encoder(extra)


def test_encoders_reject_bad_ids():
    config = clip.CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=4)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=4"):
        clip.forward(config, {}, jnp.zeros((1, 5), jnp.int32))  # checked before any param is touched
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\]"):
        t5.forward(t5.T5EncoderConfig(num_layers=0, vocab_size=4, d_model=8), {}, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="unsupported feed_forward_proj"):
        t5.T5EncoderConfig(feed_forward_proj="gated-gelu-x")
    with pytest.raises(ValueError, match="unsupported hidden_act"):
        clip.CLIPTextConfig(hidden_act="mish")


def test_tokenizer_json_is_read_without_transformers(tokenizer_folders):
    """A folder with tokenizer.json is read by ``tokenizers`` alone: transformers is never imported (and so cannot
    print its missing-PyTorch warning), and the ids are FluxPipeline's."""
    import subprocess
    import sys
    ref_tok, folder = tokenizer_folders["t5"]
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    assert Tokenizer.from_folder(folder).kind == "tokenizers"
    code = ("import sys; from pqjax.pipeline import Tokenizer; "
            f"t = Tokenizer.from_folder({folder!r}); ids = t(['a photo of a cat'], 24); "
            "print(t.kind, 'transformers' in sys.modules, ids.tolist())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    kind, imported, ids = r.stdout.split(" ", 2)
    assert kind == "tokenizers" and imported == "False"
    ref = ref_tok(["a photo of a cat"], padding="max_length", max_length=24, truncation=True).input_ids
    assert ids.strip() == str(ref)
