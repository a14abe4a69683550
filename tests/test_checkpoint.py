"""Checkpoints (orbax) and the safetensors export: round trips, validation, atomicity under SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax.calib import CalibBatch
from pqjax.io import MANIFEST, CheckpointError
from pqjax.commands.bench import quantize_tree
from pqjax.io import load_safetensors, save_safetensors
from pqjax.formats import QTensor, nbytes
from pqjax.models import flux
from pqjax.models.flux import FluxConfig
from pqjax.formats import ActQuant
from pqjax.models.synthetic import outlier_params

CFG = FluxConfig.tiny(num_layers=1, num_single_layers=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fparams():
    return outlier_params(CFG, 0, dtype=jnp.bfloat16)


@pytest.fixture(scope="module")
def quantized(fparams):
    """A real pqjax.quantize result (nvfp4 PermuQuant: perms, act scales, report)."""
    rng = np.random.default_rng(0)   # the shapes test_cli.py calibrates with: the compilations are shared
    batch = CalibBatch(encoder_hidden_states=jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16),
                       pooled_projections=jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16),
                       height=64, width=64, num_inference_steps=2)
    qc = pqjax.QuantConfig(format="nvfp4", method="permuquant", calib_rows=64)
    q, report = pqjax.quantize(fparams, batch, config=qc, model_config=CFG, progress=False)
    assert report.perms, "the outlier model should accept some permutations"
    return q, report


@pytest.fixture(scope="module")
def variants(fparams):
    """Quantized trees covering every stored variant: int3 (no global scale), SmoothQuant factors, Hadamard."""
    return {"int3-smoothquant": quantize_tree(CFG, fparams, "int3", method="smoothquant")[0],
            "int4-permuquant-h": quantize_tree(CFG, fparams, "int4", method="permuquant-h")[0]}


def _inputs(seed=1, batch=1, n_img=16, n_txt=8):
    rng = np.random.default_rng(seed)
    return dict(hidden_states=jnp.asarray(rng.standard_normal((batch, n_img, 64)), jnp.bfloat16),
                encoder_hidden_states=jnp.asarray(rng.standard_normal((batch, n_txt, 64)), jnp.bfloat16),
                pooled_projections=jnp.asarray(rng.standard_normal((batch, 64)), jnp.bfloat16),
                timestep=jnp.full((batch,), 0.4, jnp.bfloat16), guidance=jnp.full((batch,), 3.5, jnp.float32),
                img_ids=pqjax.pipeline.prepare_img_ids(4, 4), txt_ids=jnp.zeros((n_txt, 3)))


_FWD = {}


def _fwd(params):
    """The forward output (one jitted function per tree structure, so a restored tree reuses the compilation)."""
    key = jax.tree_util.tree_structure(params)
    if key not in _FWD:
        _FWD[key] = jax.jit(lambda p: flux.forward(CFG, p, **_inputs()))
    return np.asarray(_FWD[key](params).astype(jnp.float32))


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1).view(np.uint8)


def assert_identical(a, b):
    """Same tree structure (incl. QTensor/ActQuant static fields), dtypes, shapes and bits."""
    sa = jax.tree_util.tree_structure(a)
    sb = jax.tree_util.tree_structure(b)
    assert sa == sb
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------- orbax round trips

def test_float_roundtrip(tmp_path, fparams):
    path = pqjax.save(tmp_path / "float", fparams, CFG)
    ck = pqjax.load(path)
    assert ck.config == CFG and ck.kind == "float" and not ck.quantized
    assert ck.quant_config is None and ck.report is None
    assert ck.info["versions"]["pqjax"] == pqjax.__version__ and ck.info["versions"]["jax"] == jax.__version__
    assert_identical(fparams, ck.params)
    np.testing.assert_array_equal(_fwd(fparams), _fwd(ck.params))
    # restore with a cast and onto an explicit sharding (the path a sharded multi-device restore takes)
    seen = []
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ck32 = pqjax.load(path, dtype=jnp.float32, sharding=lambda p, s, d: seen.append(p) or dev)
    assert {leaf.dtype for leaf in jax.tree.leaves(ck32.params)} == {jnp.dtype(jnp.float32)}
    assert "transformer_blocks.0.attn.to_q.kernel" in seen
    assert all(leaf.sharding == dev for leaf in jax.tree.leaves(ck32.params))


def test_quantized_roundtrip(tmp_path, quantized):
    q, report = quantized
    path = pqjax.save(tmp_path / "q", q, CFG, report)
    ck = pqjax.load(path)
    assert ck.kind == "nvfp4" and ck.quantized
    assert ck.quant_config == report.config
    assert_identical(q, ck.params)
    np.testing.assert_array_equal(_fwd(q), _fwd(ck.params))
    assert ck.report.summary() == report.summary()
    assert ck.report.table() == report.table()
    assert set(ck.report.perms) == set(report.perms)
    for k, v in report.perms.items():
        np.testing.assert_array_equal(ck.report.perms[k], v)
    # abstract: only the manifest is read; same packed bytes as the real tree, QTensor statics intact
    ab = pqjax.load(path, abstract=True)
    assert nbytes(ab.params) == nbytes(q)
    k = ab.params["transformer_blocks"]["0"]["attn"]["to_q"]["kernel"]
    assert isinstance(k, QTensor) and isinstance(k.codes, jax.ShapeDtypeStruct) and k.fmt == "nvfp4"


@pytest.mark.parametrize("name", ["int3-smoothquant", "int4-permuquant-h"])
def test_variant_roundtrip(tmp_path, variants, name):
    q = variants[name]
    ck = pqjax.load(pqjax.save(tmp_path / name, q, CFG))
    assert_identical(q, ck.params)          # bit-identical trees: identical outputs (shown above for nvfp4)
    act = ck.params["transformer_blocks"]["0"]["attn"]["to_q"]["act_quant"]
    assert isinstance(act, ActQuant) and act.hadamard == name.endswith("-h")
    assert (act.smooth is not None) == ("smoothquant" in name)


# ---------------------------------------------------------------------------------------------- validation

def test_save_refuses_bad_input(tmp_path, fparams, quantized):
    q, report = quantized
    with pytest.raises(CheckpointError, match="do not match the model config"):
        pqjax.save(tmp_path / "a", fparams, FluxConfig.tiny())            # params of another config
    with pytest.raises(CheckpointError, match="quantization config says"):
        pqjax.save(tmp_path / "b", q, CFG, quant_config=pqjax.QuantConfig(format="int4"))
    with pytest.raises(CheckpointError, match="no quantized tensors"):
        pqjax.save(tmp_path / "c", fparams, CFG, report)
    with pytest.raises(CheckpointError, match="FluxConfig"):
        pqjax.save(tmp_path / "d", fparams, CFG.to_dict())
    pqjax.save(tmp_path / "e", fparams, CFG)
    with pytest.raises(CheckpointError, match="already exists"):
        pqjax.save(tmp_path / "e", fparams, CFG)
    pqjax.save(tmp_path / "e", q, CFG, report, overwrite=True)
    assert pqjax.load(tmp_path / "e").kind == "nvfp4"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("e.")] == []   # no leftovers
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "x.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a pqjax checkpoint"):
        pqjax.save(tmp_path / "notckpt", fparams, CFG, overwrite=True)


def test_load_validates(tmp_path, fparams):
    path = pqjax.save(tmp_path / "ck", fparams, CFG)
    with pytest.raises(CheckpointError, match="another model.*num_single_layers"):
        pqjax.load(path, expect_config=FluxConfig.tiny(num_layers=1))
    with pytest.raises(CheckpointError, match="is float, expected nvfp4"):
        pqjax.load(path, expect_format="nvfp4")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        pqjax.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"no {MANIFEST}"):
        pqjax.load(tmp_path / "empty")
    # a checkpoint from a newer pqjax
    m = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    m["format_version"] = 99
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format version 99.*upgrade pqjax"):
        pqjax.load(path)
    # a truncated manifest, a missing arrays directory, a manifest that disagrees with the arrays
    m["format_version"] = 1
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(m)[:100])
    with pytest.raises(CheckpointError, match="corrupt checkpoint manifest"):
        pqjax.load(path)
    bad = json.loads(json.dumps(m))
    bad["tree"]["children"]["proj_out"]["children"]["bias"]["shape"] = [7]
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="corrupt checkpoint.*proj_out"):
        pqjax.load(path)
    (tmp_path / "ck" / MANIFEST).write_text(json.dumps(m))
    os.rename(tmp_path / "ck" / "arrays", tmp_path / "ck" / "gone")
    with pytest.raises(CheckpointError, match="no arrays/"):
        pqjax.load(path)


# ---------------------------------------------------------------------------------------------- atomicity

_SAVER = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    import pqjax
    from pqjax.models.flux import FluxConfig
    from pqjax.models.synthetic import outlier_params
    mode, path = sys.argv[1], sys.argv[2]
    cfg = FluxConfig.tiny(num_layers=1, num_single_layers=2)
    params = outlier_params(cfg, 0, dtype=jnp.float32)
    real = os.rename
    calls = [0]
    def rename(a, b):   # die just before (kill-before-N) or just after (kill-after-N) the N-th rename of a save
        calls[0] += 1
        when, n = mode.rsplit("-", 1)
        if when == "kill-before" and calls[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(a, b)
        if when == "kill-after" and calls[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    os.rename = rename
    print("saving", flush=True)
    pqjax.save(path, params, cfg)
    print("saved", flush=True)
""")


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def test_killed_save_leaves_nothing_loadable(tmp_path):
    """SIGKILL at every commit point of pqjax.save (orbax's rename of arrays/, pqjax's rename of the directory) and
    at an arbitrary moment while arrays are written: PATH never loads unless the final rename happened."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    # a save makes exactly two renames: orbax's arrays commit, then pqjax's directory commit
    outcomes = {}
    for mode in ("kill-before-1", "kill-before-2", "kill-after-2", "timed-0"):
        path = tmp_path / mode
        proc = subprocess.Popen([sys.executable, str(script), mode, str(path)], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if mode == "timed-0":  # kill as soon as the save has started writing
            assert proc.stdout.readline().strip() == "saving"
            deadline = time.time() + 60
            while not any(p.name.startswith(path.name + ".partial-") for p in tmp_path.iterdir()):
                assert time.time() < deadline and proc.poll() is None, "save never started"
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (mode, proc.returncode)
        try:
            outcomes[mode] = pqjax.load(path).kind
        except CheckpointError as e:
            outcomes[mode] = str(e)
    for mode in ("kill-before-1", "kill-before-2", "timed-0"):
        assert "no such checkpoint" in outcomes[mode] and "interrupted" in outcomes[mode], outcomes[mode]
        assert not (tmp_path / mode).exists()
    assert outcomes["kill-after-2"] == "float"       # the rename is the commit point: after it, it is complete
    # a stale partial never blocks the next save
    cfg = FluxConfig.tiny(num_layers=1, num_single_layers=2)
    p = outlier_params(cfg, 0)
    pqjax.save(tmp_path / "kill-before-2", p, cfg)
    assert pqjax.load(tmp_path / "kill-before-2").kind == "float"


# ---------------------------------------------------------------------------------------------- safetensors

def test_safetensors_roundtrip(tmp_path, quantized, variants):
    q, report = quantized
    path = save_safetensors(tmp_path / "q.safetensors", q, CFG, report)
    ck = load_safetensors(path)
    assert_identical(q, ck.params)
    assert ck.config == CFG and ck.quant_config == report.config and ck.report.summary() == report.summary()
    for name, v in variants.items():
        assert_identical(v, load_safetensors(save_safetensors(tmp_path / f"{name}.safetensors", v, CFG)).params)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_safetensors_layout_is_documented(tmp_path, quantized, variants):
    """Names, dtypes and shapes as documented, readable by the reference safetensors library (torch)."""
    from safetensors import safe_open
    q, report = quantized
    path = save_safetensors(tmp_path / "q.safetensors", q, CFG, report)
    m = "transformer_blocks.0.attn.to_q"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    import torch
    K = N = CFG.inner_dim
    assert t[f"{m}.weight_packed"].dtype == torch.uint8 and tuple(t[f"{m}.weight_packed"].shape) == (N, K // 2)
    assert t[f"{m}.weight_scale"].dtype == torch.float8_e4m3fn and tuple(t[f"{m}.weight_scale"].shape) == (N, K // 16)
    assert t[f"{m}.weight_global_scale"].dtype == torch.float32 and t[f"{m}.weight_global_scale"].ndim == 0
    assert t[f"{m}.input_global_scale"].dtype == torch.float32
    assert t["x_embedder.weight"].dtype == torch.bfloat16 and tuple(t["x_embedder.weight"].shape) == (N, 64)
    assert tuple(t["transformer_blocks.0.attn.norm_q.weight"].shape) == (CFG.attention_head_dim,)
    mod = "transformer_blocks.0.norm1.linear"   # weight-only: no input scale
    assert f"{mod}.weight_packed" in t and f"{mod}.input_global_scale" not in t
    assert any(k.endswith(".perm") and t[k].dtype == torch.int32 for k in t)
    qc = json.loads(meta["quantization_config"])
    assert qc["quant_method"] == "pqjax" and qc["format"] == "nvfp4" and qc["method"] == "permuquant"
    assert qc["layers"][m] == {"mode": "w4a4", "fmt": "nvfp4", "group_size": 16, "shape": [K, N], "axis": 0,
                               "dtype": q["transformer_blocks"]["0"]["attn"]["to_q"]["kernel"].dtype, "hadamard": False}
    assert qc["layers"][mod]["mode"] == "w4a16"
    assert json.loads(meta["model_config"]) == CFG.to_dict()
    # dequantizing the documented tensors by hand gives the QTensor's weights
    from pqjax.formats import e2m1_decode, unpack_4bit
    codes = unpack_4bit(jnp.asarray(t[f"{m}.weight_packed"].numpy()))
    scales = np.asarray(t[f"{m}.weight_scale"].float().numpy())
    g = float(t[f"{m}.weight_global_scale"])
    w = np.asarray(e2m1_decode(codes), np.float32) * np.repeat(scales, 16, axis=1) * g
    kernel = q["transformer_blocks"]["0"]["attn"]["to_q"]["kernel"]
    np.testing.assert_array_equal(w.T, np.asarray(kernel.dequantize(jnp.float32)))
    # int3: 3 bytes per 8 codes, bf16 group scales, no global scale
    path3 = save_safetensors(tmp_path / "i3.safetensors", variants["int3-smoothquant"], CFG)
    with safe_open(path3, "pt") as f:
        assert tuple(f.get_tensor(f"{m}.weight_packed").shape) == (N, 3 * K // 8)
        assert f.get_tensor(f"{m}.weight_scale").dtype == torch.bfloat16
        assert f"{m}.weight_global_scale" not in f.keys() and f"{m}.input_smooth" in f.keys()


def test_float_safetensors_is_diffusers_compatible(tmp_path, fparams):
    """A float export is a diffusers single file: converters.load_flux reads it back to the same params."""
    import converters
    folder = tmp_path / "m"
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", fparams, CFG)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **CFG.to_dict()}))
    config, params = converters.load_flux(str(folder), dtype=jnp.bfloat16)
    assert config == CFG
    assert_identical(fparams, params)
    assert_identical(fparams, load_safetensors(folder / "diffusion_pytorch_model.safetensors").params)


def test_safetensors_import_rejects(tmp_path, quantized):
    from safetensors.numpy import save_file
    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not written by pqjax"):
        load_safetensors(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_safetensors(tmp_path / "missing.safetensors")
    # a newer format version
    q, report = quantized
    path = save_safetensors(tmp_path / "q.safetensors", q, CFG, report)
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["pqjax_format_version"] = "7"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    open(path, "wb").write(raw[:8] + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match="version 7.*upgrade pqjax"):
        load_safetensors(path)
