"""The shipped demo model: what ships (size, diffusers naming, parity with diffusers), that it draws what captions
ask for, calibration on its own schedule, quantize + ShapeEval plumbing, and ``pqjax demo`` /
``pqjax eval --shapeeval`` with their bad inputs."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax.calib import CalibBatch, calibrate
from cli_helpers import fresh_seed as _fresh_seed, run_main
from pqjax.models import flux
from tolerances import flux_depth, flux_k, fp32_bound
from pqjax.pipeline import prepare_img_ids, prepare_txt_ids
from pqjax.demo import assets, shapeeval
from pqjax.demo import benchmark as B
from pqjax.demo import model as td


@pytest.fixture(scope="module")
def state():
    return assets.load_demo_model()  # a pqjax.demo.model.DemoModel


@pytest.fixture(scope="module")
def cls():
    return assets.load_shapeeval()


def test_shipped_files_and_size():
    folder = assets.DEMO_MODEL
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    assert (folder / "transformer" / "config.json").is_file() and weights.is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file() and assets.SHAPEEVAL.is_file()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 10 * 2 ** 20, f"demo model is {total / 2 ** 20:.2f} MiB (> 10 MiB)"
    from safetensors import safe_open
    with safe_open(weights, "np") as f:
        keys = set(f.keys())
    assert {"x_embedder.weight", "transformer_blocks.0.attn.to_q.weight", "proj_out.weight",
            "single_transformer_blocks.0.proj_mlp.weight"} <= keys


def test_shipped_transformer_matches_diffusers(state):
    """diffusers' FluxTransformer2DModel loads the shipped folder and computes what our forward computes."""
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(str(assets.DEMO_MODEL / "transformer"), torch_dtype=torch.float32)
    rng = np.random.default_rng(_fresh_seed())
    x = rng.standard_normal((2, 64, 48)).astype(np.float32)
    ctx = rng.standard_normal((2, 16, 64)).astype(np.float32)
    pooled = rng.standard_normal((2, 64)).astype(np.float32)
    t = rng.uniform(0.05, 1.0, 2).astype(np.float32)
    img_ids, txt_ids = np.asarray(prepare_img_ids(8, 8)), np.asarray(prepare_txt_ids(16))
    with torch.no_grad():
        ref = model(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                    pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                    img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids)).sample.numpy()
    ours = np.asarray(flux.forward(state.config.flux, state.params["transformer"], hidden_states=x,
                                   encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                                   img_ids=img_ids, txt_ids=txt_ids))
    fc = state.config.flux
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= fp32_bound(flux_k(fc.inner_dim, 64 + 16),
                                                                          flux_depth(fc.num_layers, fc.num_single_layers))


def test_shipped_model_draws_what_captions_ask_for(state, cls):
    """Fresh held-out prompts, every task: the float model is scored by the shipped classifier (full-scale numbers:
    docs/RESULTS.md). The bar sits below the full-run accuracy to allow for 36-prompt sampling noise."""
    items = shapeeval.prompts(6, seed=_fresh_seed())
    res = shapeeval.score(cls, td.generate(state, [it.caption for it in items], seed=_fresh_seed()), items)
    assert res["overall"] >= 0.75, res["tasks"]
    # and the captions matter: the same images judged against shuffled prompts score far lower
    images = td.generate(state, [it.caption for it in items], seed=1)
    shuffled = [items[(i + 7) % len(items)] for i in range(len(items))]
    assert shapeeval.score(cls, images, shuffled)["overall"] < res["overall"] - 0.2


def test_calibration_follows_the_demo_schedule(state):
    """x_embedder's input over a 2-step trajectory is x0 then x1 = x0 + (sigma1 - sigma0) v(x0): with the demo's
    static shift-1 schedule sigma = (1, 0.5). Recomputed here in float64 from one forward call."""
    hidden, pooled = td.encode_captions(state, ["a red circle on the left", "two green squares"])
    x0 = td.initial_noise(3, 2)
    batch = CalibBatch(hidden, pooled, height=32, width=32, num_inference_steps=2, latents=x0,
                       scheduler_config=td.SCHEDULER, vae_scale_factor=td.PATCH)
    stats = calibrate(state.config.flux, state.params["transformer"], batch, taps=["x_embedder"], num_rows=16)
    v = flux.forward(state.config.flux, state.params["transformer"], hidden_states=x0, encoder_hidden_states=hidden,
                     pooled_projections=pooled, timestep=jnp.ones(2), img_ids=prepare_img_ids(8, 8),
                     txt_ids=prepare_txt_ids(hidden.shape[1]))
    a0 = np.asarray(x0, np.float64)
    a1 = a0 - 0.5 * np.asarray(v, np.float64)
    want = (a0 ** 2).sum(axis=(0, 1)) + (a1 ** 2).sum(axis=(0, 1))
    st = stats["x_embedder"]
    assert float(st.count) == 2 * 2 * 64
    # the jitted calibration pass evaluates the forward in its own rounding order; a square doubles the relative error
    fc = state.config.flux
    bound = 2 * fp32_bound(flux_k(fc.inner_dim, 64 + 16), flux_depth(fc.num_layers, fc.num_single_layers))
    np.testing.assert_allclose(np.asarray(st.sumsq, np.float64), want, rtol=bound)
    # FLUX.1-dev's default (shifted) schedule visits another trajectory
    other = calibrate(state.config.flux, state.params["transformer"],
                      CalibBatch(hidden, pooled, height=32, width=32, num_inference_steps=2, latents=x0,
                                 vae_scale_factor=td.PATCH), taps=["x_embedder"], num_rows=16)
    assert not np.allclose(np.asarray(other["x_embedder"].sumsq), want, rtol=1e-3)


def test_quantize_and_run_variant_metrics(state, cls):
    items = shapeeval.prompts(1, seed=_fresh_seed())
    ref = B.run_variant(state, cls, items, steps=4)
    same = B.run_variant(state, cls, items, steps=4, reference=ref)
    assert same.latent_rel_err == 0.0 and np.isinf(same.psnr) and same.tasks == ref.tasks
    calib = B.calib_batch(state, n=4, steps=2)
    q, rep = B.quantize_demo(state, "int3", "permuquant", calib=calib, calib_rows=64)
    assert rep.sites and all(s.e_best <= s.e_orig * (1 + 1e-6) for s in rep.sites)
    r = B.run_variant(state, cls, items, transformer=q, steps=4, reference=ref)
    zq = td.generate_latents(state, [it.caption for it in items], steps=4, transformer=q).astype(np.float64)
    z = ref.latents.astype(np.float64)
    assert r.latent_rel_err == pytest.approx(np.sqrt(((zq - z) ** 2).sum() / (z ** 2).sum()), rel=1e-6)
    assert r.latent_rel_err > 1e-3
    mse = ((r.images.astype(np.float64) - ref.images.astype(np.float64)) ** 2).mean()
    assert r.psnr == pytest.approx(10 * np.log10(255.0 ** 2 / mse), rel=1e-9)
    table = B.markdown_table([ref, r])
    assert table.count("\n") == 3 and "| float |" in table


def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, stdout, err = run_main(capsys, "demo", "--out", out, "--steps", "3", "--variants", "int4:permuquant",
                               "--captions", "a red circle on the left; two blue squares")
    assert rc == 0, err
    assert (out / "grid.png").is_file()
    rep = json.loads((out / "report.json").read_text())
    assert rep["captions"] == ["a red circle on the left", "two blue squares"]
    assert [v["variant"] for v in rep["variants"]] == ["int4:permuquant"]
    assert rep["variants"][0]["latent_rel_err"] > 0 and set(rep["read"]) == {"float", "int4:permuquant"}
    from PIL import Image
    grid = Image.open(out / "grid.png")
    w, h = grid.size
    assert w > 2 * 32 * 4 and h > 2 * 32 * 4  # 2 columns x 2 rows of 4x-scaled 32 px images
    assert json.loads(grid.text["captions"]) == rep["captions"] and grid.text["steps"] == "3"
    # a second run into the same folder needs --overwrite
    rc, _, err = run_main(capsys, "demo", "--out", out, "--steps", "3", "--variants", "")
    assert rc == 1 and "already exists and is not empty" in err


@pytest.mark.parametrize("argv, needle", [
    (["--captions", "a red dog"], "['dog']"),
    (["--variants", "nvfp4:magic"], "'nvfp4:magic'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--demo-model", "no-such-folder"], "no-such-folder"),
])
def test_demo_bad_input(tmp_path, capsys, argv, needle):
    out = tmp_path / "demo"
    rc, _, err = run_main(capsys, "demo", "--out", out, *argv)
    assert rc != 0 and needle in err and "pqjax demo: error:" in err, err
    assert not out.exists()  # nothing half-written


def test_eval_shapeeval_command(tmp_path, capsys):
    j, m = tmp_path / "se" / "shapeeval.json", tmp_path / "se" / "shapeeval.md"
    rc, out, err = run_main(capsys, "eval", "--shapeeval", "--per-task", "1", "--steps", "3", "--variants",
                            "nvfp4:rtn", "--out", tmp_path / "se")
    assert rc == 0, err
    res = json.loads(j.read_text())
    assert [r["name"] for r in res["rows"]] == ["float", "nvfp4:rtn"]
    assert set(res["rows"][0]["tasks"]) == set(shapeeval.TASKS)
    assert res["rows"][1]["latent_rel_err"] > 0 and "| nvfp4:rtn |" in m.read_text()


def test_eval_shapeeval_scores_a_saved_checkpoint(state, tmp_path, capsys):
    """A quantized checkpoint of the demo transformer, saved with pqjax, scores like the in-memory one."""
    from pqjax.io import checkpoint
    calib = B.calib_batch(state, n=4, steps=2)
    q, rep = B.quantize_demo(state, "nvfp4", "rtn", calib=calib)
    checkpoint.save(tmp_path / "q", q, state.config.flux, rep, quant_config=rep.config)
    j = tmp_path / "se" / "shapeeval.json"
    rc, _, err = run_main(capsys, "eval", "--shapeeval", tmp_path / "q", "--per-task", "1", "--steps", "3",
                          "--out", tmp_path / "se")
    assert rc == 0, err
    rows = json.loads(j.read_text())["rows"]
    items = shapeeval.prompts(1)
    direct = td.generate_latents(state, [it.caption for it in items], steps=3, transformer=q)
    ref = td.generate_latents(state, [it.caption for it in items], steps=3)
    want = np.linalg.norm(direct - ref) / np.linalg.norm(ref)
    assert rows[1]["latent_rel_err"] == pytest.approx(want, rel=1e-5)


def test_eval_shapeeval_bad_input(tmp_path, capsys):
    import converters
    from pqjax.models.flux import FluxConfig
    other = tmp_path / "other"
    cfg = FluxConfig.tiny(num_layers=1, num_single_layers=1)
    converters.save_diffusers(other, cfg, jax.tree.map(np.asarray, flux.init_params(cfg, jax.random.key(0))))
    res = tmp_path / "se"
    for argv, needle in ((["--shapeeval", other], str(other)),
                         (["--shapeeval", "--variants", "int5:rtn"], "'int5:rtn'"),
                         (["--shapeeval", "--per-task", "0"], "--per-task must be >= 1"),
                         (["--shapeeval", tmp_path / "missing"], "missing: no such file"),
                         ([], "needs FLOAT and QUANT")):
        rc, _, err = run_main(capsys, "eval", *argv, "--out", res)
        assert rc != 0 and needle in err and "pqjax eval: error:" in err, (argv, err)
        assert not res.exists()


def test_results_script_writes_the_table(tmp_path):
    """examples/results.py (small settings): RESULTS.md with one row per variant, notes derived from the numbers,
    and a grid; results.json agrees with the table."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "results.py"
    spec = importlib.util.spec_from_file_location("pqjax_results_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--per-task", "1", "--steps", "3", "--calib", "4", "--formats", "int3", "--small-group", "32",
                     "--methods", "rtn,hadamard,permuquant,permuquant-h", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "RESULTS.md").read_text()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["float", "int3 RTN", "int3 Hadamard", "int3 PermuQuant",
                                         "int3 PermuQuant-H", "int3 g32 RTN", "int3 g32 Hadamard",
                                         "int3 g32 PermuQuant", "int3 g32 PermuQuant-H"]
    for r in rows[1:]:
        assert f"| {r['name']} |" in md and f"{r['latent_rel_err']:.4f}" in md
    assert "int3, PermuQuant vs RTN:" in md and "int3, PermuQuant-H vs Hadamard:" in md
    assert (tmp_path / "results_grid.png").is_file()
