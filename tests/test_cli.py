"""The ``pqjax`` command line on a tiny synthetic FLUX: convert -> quantize (every method) -> sample -> eval, bench,
and the failures a new user runs into (exit code 1 or 2 with a one-line reason).

Most cases call ``pqjax.cli.main`` in-process (a subprocess pays the jax import each time); the new-user walk-through
runs the real console script in subprocesses inside a temporary directory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import pqjax
from cli_helpers import run_main
from pqjax.cli import main
from pqjax.models.flux import FluxConfig
from pqjax.models.synthetic import outlier_params

CFG = FluxConfig.tiny(num_layers=1, num_single_layers=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB = ["--steps", "2", "--height", "64", "--width", "64", "--calib-rows", "64"]


def write_diffusers_folder(folder, config: FluxConfig, seed: int = 0) -> str:
    """The synthetic outlier FLUX saved like diffusers' save_pretrained (config.json + safetensors, float32)."""
    from converters import state_dict_layout
    params = outlier_params(config, seed)
    sd = {}
    for key, leaf in state_dict_layout(config).items():
        a = params
        for name in leaf.path:
            a = a[name]
        a = np.asarray(a, np.float32)
        sd[key] = np.ascontiguousarray(a.T if leaf.transpose else a)
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.0", **config.to_dict()}, f)
    return str(folder)


def write_embeds(path, config: FluxConfig, n: int = 2, tokens: int = 8, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    save_file({"encoder_hidden_states": rng.standard_normal((n, tokens, config.joint_attention_dim)).astype(np.float32),
               "pooled_projections": rng.standard_normal((n, config.pooled_projection_dim)).astype(np.float32)},
              str(path))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A converted tiny model + embeddings, shared by the in-process tests."""
    d = tmp_path_factory.mktemp("cli")
    src = write_diffusers_folder(d / "flux-tiny", CFG)
    emb = write_embeds(d / "embeds.safetensors", CFG)
    assert main(["convert", src, str(d / "model"), "--quiet"]) == 0
    return d


def one_line_error(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith(f"pqjax {command}: error: "), err
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    return lines[-1]


# ---------------------------------------------------------------------------------------------- help

@pytest.mark.parametrize("command", ["convert", "quantize", "eval", "bench"])
def test_help(capsys, command):
    rc, out, _ = run_main(capsys, command, "--help")
    assert rc == 0 and f"usage: pqjax {command}" in out and "--quiet" in out


# ---------------------------------------------------------------------------------------------- quantize

@pytest.mark.parametrize("fmt,method", [("nvfp4", "rtn"), ("nvfp4", "smoothquant"), ("nvfp4", "hadamard"),
                                        ("nvfp4", "permuquant"), ("int4", "permuquant-h"), ("int3", "permuquant")])
def test_quantize_methods(capsys, work, fmt, method):
    out_dir = work / f"q-{fmt}-{method}"
    rc, out, err = run_main(capsys, "quantize", work / "model", out_dir, "--format", fmt, "--method", method,
                            "--embeddings", work / "embeds.safetensors", *CALIB)
    assert rc == 0, err
    assert f"{method} {fmt}" in out and "sites" in out and f"wrote {out_dir}" in out
    # progress is logged on stderr: the calibration's first step (with compilation) apart from its steady rate
    assert "pqjax quantize: calibrate: 2 steps, step 1 " in err and "pqjax quantize: searched " in err
    ck = pqjax.load(out_dir)
    assert ck.kind == fmt and ck.quant_config.method == method and ck.config == CFG
    assert ck.quant_config.group_size == (16 if fmt == "nvfp4" else 64)     # the group used, not "default"
    assert ck.report.summary() in out


def test_quantize_options_quiet_safetensors(capsys, work):
    rules = work / "rules.json"
    rules.write_text(json.dumps([["single_transformer_blocks\\..*", "keep"],
                                 {"pattern": ".*norm1.*", "action": "w4a16"}, [".*", "w4a4"]]))
    report = work / "report.json"
    out_file = work / "q.safetensors"
    rc, out, err = run_main(capsys, "quantize", work / "model", out_file, "--format", "int4", "--group-size", "32",
                            "--alpha-grid", "0,1", "--tau", "0.01", "--rules", rules, "--report", report,
                            "--embeddings", work / "embeds.safetensors", *CALIB, "--quiet", "--table")
    assert rc == 0 and err == "", err                        # --quiet: nothing on stderr
    assert "K " in out and "gain" in out                     # --table
    from pqjax.io import load_safetensors
    ck = load_safetensors(out_file)
    assert ck.kind == "int4" and ck.quant_config.group_size == 32 and ck.quant_config.alpha_grid == (0.0, 1.0)
    assert not hasattr(ck.params["single_transformer_blocks"]["0"]["proj_mlp"]["kernel"], "fmt")
    rep = json.loads(report.read_text())
    assert rep["config"]["tau"] == 0.01 and rep["modes"]["single_transformer_blocks.0.proj_mlp"] == "keep"


# ---------------------------------------------------------------------------------------------- eval, bench

def test_eval(capsys, work):
    q = work / "q-nvfp4-permuquant"
    if not q.exists():
        assert main(["quantize", str(work / "model"), str(q), "--method", "permuquant", "--embeddings",
                     str(work / "embeds.safetensors"), *CALIB, "--quiet"]) == 0
        capsys.readouterr()
    res_dir = work / "eval-out"
    js, md = res_dir / "eval.json", res_dir / "eval.md"
    rc, out, err = run_main(capsys, "eval", work / "model", q, "--embeddings", work / "embeds.safetensors", "--seed",
                            3, "--steps", 2, "--height", 64, "--width", 64, "--out", res_dir)
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert res["space"] == "latent" and res["format"] == "nvfp4" and res["method"] == "permuquant"
    assert len(res["samples"]) == 2 and [s["seed"] for s in res["samples"]] == [3, 3]
    m = res["mean"]
    assert 0 < m["latent_rel_err"] < 0.5 and 10 < m["psnr"] < 80 and 0.5 < m["ssim"] <= 1
    sites = {r["site"]: r for r in res["sites"]}
    assert "transformer_blocks.0.P2" in sites and "MOD" in sites
    assert all(0 < r["rel_err"] < 0.5 for r in res["sites"])
    assert len(res["linears"]) == 20                     # every quantized linear of the 1+1-block model
    text = md.read_text()
    assert "| site | linears | rel. err |" in text and "unpacked latents (no VAE)" in text
    assert "PSNR" in out and "wrote" in out
    # the results folder is not overwritten without --overwrite; nothing else is written then
    before = js.read_text()
    rc, _, err = run_main(capsys, "eval", work / "model", q, "--embeddings", work / "embeds.safetensors", "--steps", 1,
                          "--height", 64, "--width", 64, "--out", res_dir)
    assert rc == 1 and "already exists and is not empty (use --overwrite" in one_line_error(err, "eval")
    assert js.read_text() == before


def test_eval_metrics_are_sane():
    from pqjax import evaluate
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 16))
    assert evaluate.ssim(x, x, 4.0) == pytest.approx(1.0) and evaluate.psnr(x, x, 4.0) == float("inf")
    noisy = x + 0.1 * rng.standard_normal(x.shape)
    assert evaluate.psnr(noisy, x, 1.0) == pytest.approx(20.0, abs=0.3)       # mse 0.01 -> 20 dB
    assert 0.5 < evaluate.ssim(noisy, x, 8.0) < 1.0
    assert abs(evaluate.ssim(rng.standard_normal(x.shape), x, 8.0)) < 0.2          # unrelated images
    assert evaluate.relative_error(2 * x, x) == pytest.approx(1.0)


def test_bench(capsys, tmp_path):
    rc, out, _ = run_main(capsys, "bench", "--memory", "--preset", "flux-dev", "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["params"] == 11_901_408_320 and res["bf16_bytes"] == 2 * res["params"]
    assert res["nvfp4"]["ratio"] >= 3.5 and 6.2 < res["nvfp4"]["gib"] < 6.4       # paper: 22.2 -> 6.3 GiB
    assert res["int4"]["ratio"] > res["nvfp4"]["ratio"] and res["int3"]["ratio"] > 4.5
    cfg = tmp_path / "config.json"        # --preset CONFIG: a diffusers config.json
    cfg.write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **CFG.to_dict()}))
    rc, out, err = run_main(capsys, "bench", "--preset", cfg, "--repeats", 1, "--height", 64, "--width", 64,
                            "--format", "nvfp4", "--method", "permuquant-h")
    assert rc == 0, err
    assert "per-step time on cpu" in out and "nvfp4 permuquant-h" in out and "bf16" in out


# ---------------------------------------------------------------------------------------------- failures

def test_failures(capsys, work, tmp_path):
    model, emb = work / "model", work / "embeds.safetensors"
    # bad paths
    rc, _, err = run_main(capsys, "quantize", tmp_path / "nope", tmp_path / "o")
    assert rc == 1 and "no such file or directory" in one_line_error(err, "quantize")
    rc, _, err = run_main(capsys, "convert", tmp_path / "nope", tmp_path / "o")
    assert rc == 1 and "no such file" in one_line_error(err, "convert")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    rc, _, err = run_main(capsys, "convert", tmp_path / "junk.safetensors", tmp_path / "o")
    assert rc == 1 and "corrupt or truncated" in one_line_error(err, "convert")
    rc, _, err = run_main(capsys, "quantize", model, model)
    assert rc == 1 and "already exists" in one_line_error(err, "quantize")
    # unknown format / method: usage errors
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--format", "fp8")
    assert rc == 2 and "invalid choice: 'fp8'" in err
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--method", "gptq")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--group-size", "48", "--format", "int4")
    assert rc == 1 and "group_size" in one_line_error(err, "quantize")
    # calibration inputs
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--embeddings", tmp_path / "nope.st")
    assert rc == 1 and "no such file" in one_line_error(err, "quantize")
    bad = write_embeds(tmp_path / "bad.safetensors", FluxConfig.tiny(joint_attention_dim=128))
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--embeddings", bad)
    assert rc == 1 and "encoder_hidden_states must be [B, N_txt, 64]" in one_line_error(err, "quantize")
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--embeddings", emb, "--prompts", emb)
    assert rc == 2 and "not allowed with" in err
    (tmp_path / "rules.json").write_text('[["x", "int8"]]')
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--rules", tmp_path / "rules.json")
    assert rc == 1 and "unknown action 'int8'" in one_line_error(err, "quantize")
    (tmp_path / "rules.json").write_text('{oops')
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--rules", tmp_path / "rules.json")
    assert rc == 1 and "not valid JSON" in one_line_error(err, "quantize")
    rc, _, err = run_main(capsys, "quantize", model, tmp_path / "o", "--height", "60", "--width", "64")
    assert rc == 1 and "not divisible by 16" in one_line_error(err, "quantize")
    assert not (tmp_path / "o").exists()
    # eval: argument order, another model
    q = work / "q-nvfp4-rtn"
    if q.exists():
        rc, _, err = run_main(capsys, "eval", q, model)
        assert rc == 1 and "is not a quantized model" in one_line_error(err, "eval")
        rc, _, err = run_main(capsys, "quantize", q, tmp_path / "o")
        assert rc == 1 and "already quantized" in one_line_error(err, "quantize")
        other = tmp_path / "other"
        src = write_diffusers_folder(tmp_path / "other-src", FluxConfig.tiny(num_layers=1))
        assert main(["convert", src, str(other), "--quiet"]) == 0
        capsys.readouterr()
        rc, _, err = run_main(capsys, "eval", other, q)
        assert rc == 1 and "are different models (num_single_layers=2 vs 1)" in one_line_error(err, "eval")
    # bench
    rc, _, err = run_main(capsys, "bench", "--preset", "flux-pro", "--memory")
    assert rc == 1 and "not one of flux-dev, flux-schnell, tiny" in one_line_error(err, "bench")
    rc, _, err = run_main(capsys, "bench", "--memory", "--format", "fp8")
    assert rc == 2


# ---------------------------------------------------------------------------------------------- a new user

def _env(tmp_path):
    cache = jax.config.jax_compilation_cache_dir
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cache:  # the test session's persistent compilation cache also serves the subprocesses (same settings as
        # conftest.py, so that the compiled programs and their cache keys are the same)
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                   JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision or "default"))
    return env


def pqjax_cli(tmp_path, *argv, timeout=300):
    exe = shutil.which("pqjax")
    cmd = [exe] if exe else [sys.executable, "-m", "pqjax.cli"]
    return subprocess.run(cmd + [str(a) for a in argv], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def make_tiny_pipeline(root, **kw) -> str:
    """A diffusers FLUX pipeline folder (tiny CLIP, T5, VAE, scheduler; tests/pipeline_fixtures.py) whose
    transformer is the synthetic outlier model."""
    from pipeline_fixtures import make_pipeline
    _, path = make_pipeline(root, seed=3, **kw)
    tdir = os.path.join(path, "transformer")
    for name in os.listdir(tdir):
        os.remove(os.path.join(tdir, name))
    write_diffusers_folder(tdir, CFG)
    return path


def test_new_user_walkthrough(tmp_path):
    """The README's path, as a user types it, in an empty directory: a FLUX pipeline folder -> convert -> quantize
    (calibrated on a prompt file) -> sample PNGs -> eval on decoded images; real console script, real exit codes."""
    for mod in ("torch", "transformers", "diffusers"):   # to build the tiny pipeline folder
        pytest.importorskip(mod)
    pipe = os.path.relpath(make_tiny_pipeline(tmp_path), tmp_path)
    (tmp_path / "prompts.txt").write_text("a red cat on a mat\na lighthouse at dusk\n")
    seq = ["--max-sequence-length", "8"]
    r = pqjax_cli(tmp_path, "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("convert", "quantize", "sample", "eval", "bench"))

    r = pqjax_cli(tmp_path, "convert", pipe, "flux-tiny")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "flux-tiny" / "pqjax.json").is_file() and r.stdout.startswith("wrote ")

    r = pqjax_cli(tmp_path, "quantize", "flux-tiny", "flux-tiny-nvfp4", "--format", "nvfp4", "--method",
                  "permuquant", "--components", pipe, "--prompts", "prompts.txt", *seq, *CALIB)
    assert r.returncode == 0, r.stderr
    assert "permuquant nvfp4 (group 16)" in r.stdout and "permutations accepted" in r.stdout
    assert "encoded 2 prompt(s)" in r.stderr and "calibrate: 2 steps" in r.stderr
    assert "with the scheduler of " in r.stderr       # calibrated on the pipeline's own schedule
    assert "\r" not in r.stderr                       # no carriage-return progress lines in a log
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    r = pqjax_cli(tmp_path, "sample", "flux-tiny-nvfp4", "--components", pipe, "--prompts", "prompts.txt", "--out",
                  "images", "--steps", "2", "--height", "64", "--width", "64", *seq)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    for name in ("0000.png", "0001.png"):
        assert Image.open(tmp_path / "images" / name).size == (64, 64)

    r = pqjax_cli(tmp_path, "eval", "flux-tiny", "flux-tiny-nvfp4", "--components", pipe, "--prompts", "prompts.txt",
                  *seq, "--seed", "0", "--steps", "2", "--height", "64", "--width", "64")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "pqjax-eval" / "eval.json").read_text())
    assert res["space"] == "image" and res["embeddings"] == "prompts" and len(res["samples"]) == 2
    assert 0 < res["mean"]["latent_rel_err"] < 0.5 and res["mean"]["psnr"] > 10
    table = (tmp_path / "pqjax-eval" / "eval.md").read_text()
    assert "PSNR/SSIM on decoded images" in table and "| a lighthouse at dusk |" in table   # prompts, not indices

    # the failures a new user meets: one line on stderr, exit 1 (failure) or 2 (usage)
    r = pqjax_cli(tmp_path, "quantize", "flux-tinyy", "out")
    assert r.returncode == 1 and r.stderr.strip() == "pqjax quantize: error: flux-tinyy: no such file or directory"
    r = pqjax_cli(tmp_path, "quantize", "flux-tiny", "out", "--format", "nvfp8")
    assert r.returncode == 2 and "invalid choice: 'nvfp8'" in r.stderr
    r = pqjax_cli(tmp_path, "quantize", "flux-tiny", "out", "--prompts", "prompts.txt")
    assert r.returncode == 1 and "give --components PIPELINE_FOLDER" in one_line_error(r.stderr, "quantize")
    write_diffusers_folder(tmp_path / "other", FluxConfig.tiny(num_layers=1, joint_attention_dim=128))
    r = pqjax_cli(tmp_path, "eval", "other", "flux-tiny-nvfp4", "--steps", "1", "--height", "64", "--width", "64",
                  "--out", "eval-other")
    assert r.returncode == 1
    line = one_line_error(r.stderr, "eval")             # progress lines, then exactly one error line
    assert "are different models" in line and "joint_attention_dim=128 vs 64" in line


def test_eval_with_a_vae_that_is_not_8x(capsys, work, tmp_path):
    """A pipeline whose VAE downsamples 4x (3 blocks): quantize and eval take its sizes (40 px is a multiple of 8,
    not of 16) and eval samples and decodes at that factor (a 40x32 image is 10x8 latents, 20 packed tokens),
    measuring on the decoded 40x32 images."""
    for mod in ("torch", "transformers", "diffusers"):
        pytest.importorskip(mod)
    pipe = make_tiny_pipeline(tmp_path, vae_blocks=(8, 16, 32))
    with open(os.path.join(pipe, "vae", "config.json")) as f:
        assert len(json.load(f)["block_out_channels"]) == 3
    q = tmp_path / "q"
    size = ["--height", "40", "--width", "32", "--steps", "1"]
    rc, _, err = run_main(capsys, "quantize", work / "model", q, "--method", "rtn", "--embeddings",
                          work / "embeds.safetensors", "--components", pipe, *size, "--quiet")
    assert rc == 0, err
    rc, out, err = run_main(capsys, "eval", work / "model", q, "--components", pipe, "--embeddings",
                            work / "embeds.safetensors", "--seed", "0", *size, "--no-sites", "--out", tmp_path / "e",
                            "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["space"] == "image" and (res["height"], res["width"]) == (40, 32) and len(res["samples"]) == 2
    assert all(0 < s["latent_rel_err"] < 1 and 0 < s["ssim"] <= 1 for s in res["samples"])
    assert json.loads((tmp_path / "e" / "eval.json").read_text()) == res
