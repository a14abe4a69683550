"""converters.load_flux against independent references.

References: the seeded diffusers model's own state dict (every tensor randomized, so a swapped
name or a missing transpose cannot hide), diffusers' own BFL converter (for our BFL writer), and
diffusers' forward pass (for the converted params run through pqjax.models.flux.forward).
"""
from __future__ import annotations

import copy
import functools
import gc
import inspect
import json
import os
import shutil
import struct
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.numpy import save_file  # noqa: E402

import converters  # noqa: E402
from converters import ConversionError, diffusers_to_bfl, load_flux, state_dict_layout  # noqa: E402
from pqjax.io.safetensors import READ_STATS, SafetensorsFile  # noqa: E402
from pqjax.models import flux  # noqa: E402

from tolerances import flux_depth, flux_k, fp32_bound  # noqa: E402
from flux_fixtures import (TINY, make_diffusers_model, make_inputs, state_dict_numpy, torch_forward,  # noqa: E402
                           write_layouts)

ROPE = {"axes_dims_rope": (8, 28, 28)}  # head dim 64: not inferable from a BFL file
LAYOUTS = ["folder", "sharded", "pipeline", "bfl"]
UNGUIDED = dict(guidance_embeds=False, num_layers=1, num_single_layers=2)


class Tiny:
    def __init__(self, root, seed, **overrides):
        self.cfg = {**TINY, **overrides}
        self.model = make_diffusers_model(seed, **overrides)
        self.sd = state_dict_numpy(self.model)
        self.paths = write_layouts(self.model, root)

    def load(self, layout, dtype=jnp.float32):
        return load_flux(self.paths[layout], dtype, config_overrides=ROPE if layout == "bfl" else None)


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("guided"), seed=0)


@pytest.fixture(scope="module")
def unguided(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("unguided"), seed=1, **UNGUIDED)


def leaf(params, path):
    for p in path:
        params = params[p]
    return np.asarray(params)


def assert_params_equal_state_dict(config, params, sd, cast=lambda a: a):
    layout = state_dict_layout(config)
    assert set(layout) == set(sd)
    # the tree is exactly the model's declared layout (no extra / missing leaves)
    shapes = jax.tree.map(lambda a: a.shape, params)
    want = jax.tree.map(lambda s: s, flux.param_layout(config), is_leaf=lambda x: isinstance(x, tuple))
    assert shapes == want
    for key, lf in layout.items():
        ref = cast(sd[key].T if lf.transpose else sd[key])
        got = leaf(params, lf.path)
        assert got.dtype == ref.dtype, key
        np.testing.assert_array_equal(got, ref, err_msg=key)


# ----------------------------------------------------------------------------------------------
# conversion, without the model
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_leaf_equals_the_torch_tensor(guided, layout):
    config, params = guided.load(layout)
    assert config == flux.FluxConfig.from_dict(guided.cfg)
    assert_params_equal_state_dict(config, params, guided.sd)


@pytest.mark.parametrize("layout", ["folder", "bfl"])
def test_every_leaf_equals_the_torch_tensor_without_guidance(unguided, layout):
    config, params = unguided.load(layout)
    assert config == flux.FluxConfig.from_dict(unguided.cfg)
    assert not config.guidance_embeds and "guidance_embedder" not in params["time_text_embed"]
    assert_params_equal_state_dict(config, params, unguided.sd)


def _diffusers_bfl_converter(inner_dim):
    """diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers``, with its hard-coded
    ``inner_dim = 3072`` (FLUX.1's size) replaced by the tiny model's: an independent reference."""
    from diffusers.loaders import single_file_utils as sfu
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1
    ns = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.mark.parametrize("which", ["guided", "unguided"])
def test_bfl_writer_is_inverted_by_diffusers_own_converter(which, request):
    tiny = request.getfixturevalue(which)
    sd = {k: v.detach().clone() for k, v in tiny.model.state_dict().items()}
    bfl = diffusers_to_bfl(sd)
    assert all(isinstance(v, torch.Tensor) for v in bfl.values())
    back = _diffusers_bfl_converter(sd["x_embedder.weight"].shape[0])(dict(bfl))
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0, msg=k)
    # numpy in, numpy out, same tensors
    bfl_np = diffusers_to_bfl(tiny.sd)
    assert set(bfl_np) == set(bfl)
    for k in bfl:
        np.testing.assert_array_equal(bfl_np[k], bfl[k].numpy())


def test_bfl_file_gives_identical_params_to_the_diffusers_folder(guided):
    ca, a = guided.load("folder")
    cb, b = guided.load("bfl")
    assert ca == cb
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("layout", ["sharded", "bfl"])
def test_bf16_load_is_round_to_nearest_even_of_fp32(guided, layout):
    config, params = guided.load(layout, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    if layout == "sharded":  # bf16 is the default
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(load_flux(guided.paths[layout])[1]))
    assert_params_equal_state_dict(config, params, guided.sd, cast=lambda a: a.astype(ml_dtypes.bfloat16))
    # same as torch's own fp32 -> bf16 rounding
    w = guided.model.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    np.testing.assert_array_equal(
        leaf(params, ("transformer_blocks", "0", "attn", "to_q", "kernel")),
        w.to(torch.bfloat16).float().numpy().T.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_16_bit_sources_load_exactly(tmp_path, tdtype):
    tdt = getattr(torch, tdtype)
    model = make_diffusers_model(0).to(tdt)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    config, params = load_flux(tmp_path / "m", jnp.float32)  # widening is exact
    assert_params_equal_state_dict(config, params, sd)
    config, params = load_flux(tmp_path / "m", jnp.bfloat16)
    assert_params_equal_state_dict(config, params, sd, cast=lambda a: a.astype(ml_dtypes.bfloat16))


def test_bfl_with_comfyui_prefix_and_extra_components(guided, tmp_path):
    bfl = diffusers_to_bfl(guided.sd)
    file = {converters.bfl.PREFIX + k: v for k, v in bfl.items()}
    file["vae.decoder.conv_in.weight"] = np.ones((4, 4), np.float32)  # other components: ignored
    save_file(file, tmp_path / "comfy.safetensors")
    config, params = load_flux(tmp_path / "comfy.safetensors", jnp.float32, config_overrides=ROPE)
    assert_params_equal_state_dict(config, params, guided.sd)


def test_bfl_config_inference_for_head_dim_128(tmp_path):
    """FLUX.1-shaped heads (128): axes_dims_rope defaults to (16, 56, 56); out_channels, guidance inferred."""
    cfg = flux.FluxConfig(num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=8,
                          joint_attention_dim=32, pooled_projection_dim=24, num_layers=1, num_single_layers=3)
    rng = np.random.default_rng(0)
    sd = {k: rng.standard_normal(lf.torch_shape).astype(np.float32) for k, lf in state_dict_layout(cfg).items()}
    save_file(diffusers_to_bfl(sd), tmp_path / "f.safetensors")
    got, params = load_flux(tmp_path / "f.safetensors", jnp.float32)
    assert got == cfg and got.axes_dims_rope == (16, 56, 56) and not got.guidance_embeds
    assert_params_equal_state_dict(cfg, params, sd)


def test_bfl_head_dim_64_needs_axes_dims_rope(guided):
    with pytest.raises(ConversionError, match=r"axes_dims_rope.*head dim 64.*config_overrides"):
        load_flux(guided.paths["bfl"], jnp.float32)
    with pytest.raises(ConversionError, match="unknown FluxConfig fields.*'axes'"):
        load_flux(guided.paths["bfl"], jnp.float32, config_overrides={"axes": (8, 28, 28)})
    with pytest.raises(ConversionError, match="must equal attention_head_dim"):
        load_flux(guided.paths["bfl"], jnp.float32, config_overrides={"axes_dims_rope": (16, 56, 56)})


def test_lone_diffusers_named_file(guided, tmp_path):
    single = os.path.join(guided.paths["folder"], "diffusion_pytorch_model.safetensors")
    config, params = load_flux(single, jnp.float32)  # config.json beside it is used
    assert config == flux.FluxConfig.from_dict(guided.cfg)
    shutil.copy(single, tmp_path / "t.safetensors")  # no config.json: inferred from shapes
    config2, params2 = load_flux(tmp_path / "t.safetensors", jnp.float32, config_overrides=ROPE)
    assert config2 == config
    assert_params_equal_state_dict(config2, params2, guided.sd)


# ----------------------------------------------------------------------------------------------
# memory: one source tensor at a time
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["sharded", "bfl"])
def test_loader_holds_one_source_tensor_at_a_time(guided, layout):
    total = sum(v.nbytes for v in guided.sd.values())
    files = sorted(os.listdir(guided.paths["sharded"]))
    assert sum(f.endswith(".safetensors") for f in files) > 10  # really sharded
    src = diffusers_to_bfl(guided.sd) if layout == "bfl" else guided.sd
    largest = max(v.nbytes for v in src.values())

    gc.collect()
    READ_STATS.reset()
    before, before_bytes = READ_STATS.live, READ_STATS.live_bytes  # tensors other tests still hold (0 in order)
    guided.load(layout)
    assert READ_STATS.reads == len(src)
    assert READ_STATS.peak_live - before == 1
    assert READ_STATS.peak_live_bytes - before_bytes == largest
    assert READ_STATS.live == before
    assert largest < total / 15

    # independent of the counter: the Python/numpy heap (tracemalloc) during a load exceeds what
    # the finished params keep (numpy buffers handed to JAX zero-copy on CPU) by ~one tensor
    guided.load(layout)  # warm JAX's dispatch caches
    tracemalloc.start()
    try:
        _, params = guided.load(layout)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    transient = peak - kept
    print(f"\n{layout}: model {total / 1e6:.2f} MB, largest source tensor {largest / 1e3:.0f} KB, "
          f"heap peak during load minus what the params keep: {transient / 1e3:.0f} KB")
    assert transient < 3 * largest
    del params

    # the same measurement does see an eager loader that reads everything before converting
    f = SafetensorsFile(guided.paths["bfl"])
    tracemalloc.start()
    try:
        everything = {k: f.read(k) for k in f.keys()}
        kept_eager = [jax.device_put(np.array(v.T, copy=True)) for v in everything.values()]
        del everything
        kept, eager_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept_eager
    assert eager_peak - kept > 0.8 * total


# ----------------------------------------------------------------------------------------------
# bad input: clear errors naming the file / key and what was expected; nothing returned
# ----------------------------------------------------------------------------------------------

def _folder(tmp_path, guided, sd, name="bad"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(os.path.join(guided.paths["folder"], "config.json"), d / "config.json")
    save_file(sd, d / "diffusion_pytorch_model.safetensors")
    return d


def _raises(path, match, **kw):
    READ_STATS.reset()
    with pytest.raises(ConversionError, match=match) as e:
        load_flux(path, jnp.float32, **kw)
    assert READ_STATS.reads == 0, "tensors were read before the checkpoint was validated"
    return str(e.value)


def test_error_path_does_not_exist(tmp_path):
    _raises(tmp_path / "nope", r"nope: no such file or directory")


def test_error_pickle_checkpoint(tmp_path):
    (tmp_path / "flux.ckpt").write_bytes(b"PK\x03\x04")
    _raises(tmp_path / "flux.ckpt", r"flux.ckpt: only .safetensors checkpoints are supported")


def test_error_missing_shard(guided, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(guided.paths["sharded"], d)
    index = json.loads((d / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[3]
    os.remove(d / shard)
    _raises(d, rf"diffusion_pytorch_model.safetensors.index.json: shard '{shard}' named in the index does not exist")


def test_error_index_points_to_the_wrong_shard(guided, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(guided.paths["sharded"], d)
    p = d / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(p.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["proj_out.bias"] = shards[0] if index["weight_map"]["proj_out.bias"] != shards[0] else shards[1]
    p.write_text(json.dumps(index))
    _raises(d, r"index puts tensor 'proj_out.bias' in shard .* has no such tensor")


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:5], r"file is 5 bytes, too short for the 8-byte header length"),
    (lambda b: struct.pack("<Q", 10 ** 7) + b[8:], r"header length 10000000 runs past the end of the file"),
    (lambda b: b[:8] + b"#" + b[9:], r"header is not valid UTF-8 JSON"),
    (lambda b: b[:-1000], r"ends at byte \d+ of the data region, but the file only has \d+ data bytes"),
    (lambda b: struct.pack("<Q", 2) + b"[]", r"header is a JSON list, expected an object"),
])
def test_error_corrupt_or_truncated_file(guided, tmp_path, damage, match):
    raw = open(guided.paths["bfl"], "rb").read()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(raw))
    msg = _raises(bad, match)
    assert str(bad) in msg and "corrupt or truncated safetensors file" in msg


def test_error_corrupt_shard_names_the_shard(guided, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(guided.paths["sharded"], d)
    shard = sorted(n for n in os.listdir(d) if n.endswith("safetensors"))[2]
    (d / shard).write_bytes((d / shard).read_bytes()[:100])
    _raises(d, rf"{shard}: corrupt or truncated safetensors file")


def test_error_missing_keys_are_listed(guided, tmp_path):
    sd = dict(guided.sd)
    gone = [k for k in sd if k.startswith("single_transformer_blocks.1.")]
    for k in gone:
        del sd[k]
    msg = _raises(_folder(tmp_path, guided, sd), rf"missing keys \({len(gone)}\)")
    assert all(repr(k) in msg for k in gone) and "unexpected" not in msg
    assert "num_single_layers=2" in msg


def test_error_many_missing_keys_are_truncated(guided, tmp_path):
    sd = {k: v for k, v in guided.sd.items() if not k.startswith("transformer_blocks.")}
    n = sum(k.startswith("transformer_blocks.") for k in guided.sd)
    _raises(_folder(tmp_path, guided, sd), rf"missing keys \({n}\): .*\(\+{n - 20} more; {n} total\)")


def test_error_unexpected_keys_are_listed(guided, tmp_path):
    sd = dict(guided.sd, **{"transformer_blocks.0.attn.extra.weight": np.zeros((2, 2), np.float32),
                            "lora_A.weight": np.zeros(3, np.float32)})
    msg = _raises(_folder(tmp_path, guided, sd), r"unexpected keys \(2\): 'lora_A.weight', "
                                                  r"'transformer_blocks.0.attn.extra.weight'")
    assert "missing" not in msg


def test_error_guidance_weights_but_config_says_no_guidance(guided, tmp_path):
    d = _folder(tmp_path, guided, guided.sd)
    cfg = json.loads((d / "config.json").read_text())
    cfg["guidance_embeds"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(d, r"guidance_embeds=False.*unexpected keys \(4\): 'time_text_embed.guidance_embedder.linear_1.bias'")


def test_error_shape_disagrees_with_config(guided, tmp_path):
    sd = dict(guided.sd)
    sd["single_transformer_blocks.1.proj_mlp.weight"] = np.zeros((256, 128), np.float32)
    d = _folder(tmp_path, guided, sd)
    _raises(d, r"diffusion_pytorch_model.safetensors: tensor 'single_transformer_blocks.1.proj_mlp.weight' "
               r"has shape \(256, 128\), expected \(512, 128\)")


def test_error_shape_in_bfl_fused_tensor(guided, tmp_path):
    bfl = diffusers_to_bfl(guided.sd)
    bfl["double_blocks.1.img_attn.qkv.weight"] = bfl["double_blocks.1.img_attn.qkv.weight"][:256]
    save_file(bfl, tmp_path / "b.safetensors")
    _raises(tmp_path / "b.safetensors", r"b.safetensors: tensor 'double_blocks.1.img_attn.qkv.weight' has "
                                        r"shape \(256, 128\), expected \(384, 128\)", config_overrides=ROPE)


def test_error_bfl_missing_keys_use_bfl_names(guided, tmp_path):
    bfl = diffusers_to_bfl(guided.sd)
    del bfl["final_layer.adaLN_modulation.1.bias"], bfl["single_blocks.0.linear1.weight"]
    save_file(bfl, tmp_path / "b.safetensors")
    _raises(tmp_path / "b.safetensors", r"missing keys \(2\): 'final_layer.adaLN_modulation.1.bias', "
                                        r"'single_blocks.0.linear1.weight'", config_overrides=ROPE)


@pytest.mark.parametrize("dtype, name", [(np.int64, "I64"), (ml_dtypes.float8_e4m3fn, "F8_E4M3"),
                                         (np.float64, "F64")])
def test_error_unsupported_dtype(guided, tmp_path, dtype, name):
    sd = dict(guided.sd)
    sd["norm_out.linear.bias"] = sd["norm_out.linear.bias"].astype(dtype)
    d = _folder(tmp_path, guided, sd)
    _raises(d, rf"diffusion_pytorch_model.safetensors: tensor 'norm_out.linear.bias' has dtype {name}, "
               r"which is not supported \(supported: BF16, F16, F32\)")


def test_error_unrecognised_single_file_layout(tmp_path):
    save_file({"encoder.layers.0.weight": np.zeros((2, 2), np.float32)}, tmp_path / "x.safetensors")
    _raises(tmp_path / "x.safetensors", r"x.safetensors: unrecognised checkpoint layout: expected BFL FLUX keys "
                                        r"\(e.g. 'img_in.weight'.*diffusers.*found 1 keys.*encoder.layers.0.weight")


def test_error_folders_without_what_is_needed(guided, tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", r"empty: not a diffusers model folder: no config.json")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    _raises(pipe, r"pipe: diffusers pipeline folder \(model_index.json\) has no 'transformer' subfolder")
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    shutil.copy(os.path.join(guided.paths["folder"], "config.json"), only_bin / "config.json")
    (only_bin / "diffusion_pytorch_model.bin").write_bytes(b"")
    _raises(only_bin, r"bin: no weights: expected diffusion_pytorch_model.safetensors or "
                      r"diffusion_pytorch_model.safetensors.index.json .*only .safetensors")
    cfg = json.loads((only_bin / "config.json").read_text())
    cfg["_class_name"] = "SD3Transformer2DModel"
    (only_bin / "config.json").write_text(json.dumps(cfg))
    _raises(only_bin, r"_class_name is 'SD3Transformer2DModel', expected 'FluxTransformer2DModel'")


# ----------------------------------------------------------------------------------------------
# parity with diffusers' forward
# ----------------------------------------------------------------------------------------------

def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@functools.lru_cache(maxsize=None)
def _jitted(config):
    return jax.jit(functools.partial(flux.forward, config))


def run_forward(config, params, inputs, dtype=jnp.float32):
    args = {k: jnp.asarray(v, None if k.endswith("_ids") else dtype) for k, v in inputs.items()}
    return np.asarray(_jitted(config)(params, **args).astype(jnp.float32))


PARITY = [  # (model, layout, batch, n_img, n_txt)
    ("guided", "folder", 1, 16, 7), ("guided", "folder", 2, 24, 12), ("guided", "sharded", 2, 24, 12),
    ("guided", "pipeline", 1, 16, 7), ("guided", "bfl", 2, 24, 12), ("guided", "bfl", 1, 16, 7),
    ("unguided", "folder", 1, 24, 12), ("unguided", "bfl", 2, 16, 7),
]


@pytest.mark.parametrize("which, layout, batch, n_img, n_txt", PARITY)
def test_forward_matches_diffusers_fp32(request, which, layout, batch, n_img, n_txt):
    tiny = request.getfixturevalue(which)
    config, params = tiny.load(layout)
    seed = 100 + PARITY.index((which, layout, batch, n_img, n_txt))
    inputs = make_inputs(tiny.cfg, batch=batch, n_img=n_img, n_txt=n_txt, seed=seed)
    assert ("guidance" in inputs) == config.guidance_embeds
    ref = torch_forward(tiny.model, inputs)
    out = run_forward(config, params, inputs)
    err = rel_err(out, ref)
    print(f"\nfp32 {which}/{layout} B={batch} img={n_img} txt={n_txt}: max rel err {err:.2e}")
    assert out.shape == ref.shape == (batch, n_img, 64)
    inner = tiny.cfg["num_attention_heads"] * tiny.cfg["attention_head_dim"]
    assert err <= fp32_bound(flux_k(inner, n_img + n_txt), flux_depth(tiny.cfg["num_layers"],
                                                                      tiny.cfg["num_single_layers"]))


@pytest.mark.parametrize("which", ["guided", "unguided"])
def test_forward_bf16_error_is_small(request, which):
    """Load in bf16 and run the forward in bf16; compare to diffusers in fp32.

    diffusers (and we) cast the timestep to the compute dtype before scaling it by 1000, so a
    random timestep moves by up to 2 units in bf16 and the sinusoidal embedding changes
    completely (error ~0.35 for torch's own bf16 run). Timesteps/guidance here are exact in bf16
    after the x1000, so the number measures weight and activation rounding."""
    tiny = request.getfixturevalue(which)
    config, params = tiny.load("sharded", jnp.bfloat16)
    inputs = make_inputs(tiny.cfg, batch=2, n_img=24, n_txt=12, seed=7)
    inputs["timestep"] = np.array([0.25, 1.0], np.float32)
    if config.guidance_embeds:
        inputs["guidance"] = np.array([4.0, 2.0], np.float32)
    ref = torch_forward(tiny.model, inputs)
    err = rel_err(run_forward(config, params, inputs, jnp.bfloat16), ref)
    torch_err = rel_err(torch_forward(copy.deepcopy(tiny.model).to(torch.bfloat16), inputs), ref)
    print(f"\nbf16 {which}: pqjax max rel err {err:.2e} (diffusers' own bf16 run: {torch_err:.2e})")
    assert err <= 5e-2
