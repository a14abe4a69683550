"""Sampler: flow-match schedule, Euler step, latent packing and the jitted loop vs diffusers' FluxPipeline.

Every reference is diffusers itself (torch CPU, fp32): ``FlowMatchEulerDiscreteScheduler`` driven the
way ``FluxPipeline`` drives it, ``FluxPipeline``'s static packing helpers, and a whole tiny random
``FluxPipeline`` built offline, run with the same latents and prompt embeddings as ``sample``.
"""
import logging

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux import pipeline_flux
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from pqjax.models import flux
from pqjax.models.flux import FluxConfig

from tolerances import flux_depth, flux_k, fp32_bound
from pqjax.pipeline import (FlowMatchConfig, euler_step, flow_match_schedule, latent_size, pack_latents,
                            packed_seq_len, prepare_img_ids, prepare_txt_ids, sample, unpack_latents)

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell
FLUX_DEV_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                      "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
OTHER_SCHEDULERS = [
    {"shift": 3.0, "use_dynamic_shifting": False},                                   # SD3-like static shift
    {**FLUX_DEV_SCHEDULER, "time_shift_type": "linear"},
    {**FLUX_DEV_SCHEDULER, "shift_terminal": 0.1, "base_shift": 0.3, "max_shift": 1.3},
]


def diffusers_schedule(sched_config: dict, num_steps: int, image_seq_len: int):
    """Timesteps and sigmas exactly as FluxPipeline.__call__ computes them (steps 5 of the pipeline)."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(sched_config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = pipeline_flux.calculate_shift(
        image_seq_len, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    timesteps, n = pipeline_flux.retrieve_timesteps(sched, num_steps, "cpu", sigmas=sigmas, mu=mu)
    assert n == num_steps
    return sched, timesteps.numpy(), sched.sigmas.numpy()


# ------------------------------------------------------------------------------------------------
# Scheduler
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sched_config", [FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER] + OTHER_SCHEDULERS)
def test_schedule_matches_diffusers(sched_config):
    cfg = FlowMatchConfig.from_diffusers_config(sched_config)
    for num_steps in (1, 2, 4, 28, 50):
        if num_steps == 1 and sched_config.get("shift_terminal"):
            continue  # stretching a 1-point schedule divides by zero (NaN in diffusers too)
        for seq_len in (24, 256, 1024, 4096, 6000):
            _, ref_t, ref_s = diffusers_schedule(sched_config, num_steps, seq_len)
            t, s = flow_match_schedule(num_steps, seq_len, cfg)
            assert t.dtype == np.float32 and s.dtype == np.float32
            assert t.shape == (num_steps,) and s.shape == (num_steps + 1,) and s[-1] == 0
            np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6)
            np.testing.assert_allclose(t / 1000, ref_t / 1000, rtol=0, atol=1e-6)


def test_schedule_custom_sigmas_match_diffusers():
    rng = np.random.default_rng(1)
    custom = np.sort(rng.uniform(0.05, 1.0, 7))[::-1]
    sched = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER)
    mu = pipeline_flux.calculate_shift(700)
    ref_t, _ = pipeline_flux.retrieve_timesteps(sched, None, "cpu", sigmas=custom, mu=mu)
    t, s = flow_match_schedule(7, 700, FlowMatchConfig(), sigmas=custom)
    np.testing.assert_allclose(t, ref_t.numpy(), rtol=1e-7)
    np.testing.assert_allclose(s, sched.sigmas.numpy(), rtol=1e-7)


def test_flow_match_config_defaults_and_conversion():
    assert FlowMatchConfig() == FlowMatchConfig.from_diffusers_config(FLUX_DEV_SCHEDULER) == FlowMatchConfig.flux_dev()
    assert FlowMatchConfig.flux_schnell() == FlowMatchConfig.from_diffusers_config(FLUX_SCHNELL_SCHEDULER)
    # missing keys take the diffusers scheduler class defaults (shift=1, no dynamic shifting)
    assert FlowMatchConfig.from_diffusers_config({}) == FlowMatchConfig(shift=1.0, use_dynamic_shifting=False)
    # the exported kwargs build an equivalent diffusers scheduler
    ref = FlowMatchEulerDiscreteScheduler(**FlowMatchConfig().to_diffusers_config())
    assert FlowMatchConfig.from_diffusers_config(dict(ref.config)) == FlowMatchConfig()
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchConfig.from_diffusers_config({**FLUX_DEV_SCHEDULER, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="time_shift_type"):
        FlowMatchConfig(time_shift_type="cosine")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_euler_step_matches_scheduler_step(dtype):
    """Bit-exact vs scheduler.step, including its fp32 upcast and torch's promotion of the 0-dim dt."""
    tdt = getattr(torch, dtype)
    sched, ref_t, _ = diffusers_schedule(FLUX_DEV_SCHEDULER, 6, 1024)
    _, sigmas = flow_match_schedule(6, 1024, FlowMatchConfig())
    sched.set_begin_index(0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 64, generator=gen).to(tdt)
    x_ours = jnp.asarray(x.float().numpy()).astype(dtype)
    for i, t in enumerate(torch.from_numpy(ref_t)):
        v = torch.randn(2, 16, 64, generator=gen).to(tdt)
        x = sched.step(v, t, x, return_dict=False)[0]
        v_ours = jnp.asarray(v.float().numpy()).astype(dtype)
        jitted = jax.jit(euler_step)(x_ours, v_ours, sigmas[i], sigmas[i + 1])
        x_ours = euler_step(x_ours, v_ours, sigmas[i], sigmas[i + 1])  # op by op
        assert x.dtype == tdt and x_ours.dtype == jitted.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(x_ours, np.float32), x.float().numpy())
        # compiled, XLA may contract x + dt*v into one FMA (skips rounding dt*v): within an ulp of the inputs
        x_in = np.abs(np.asarray(x_ours, np.float32)).max() + np.abs(np.asarray(v_ours, np.float32)).max()
        np.testing.assert_allclose(np.asarray(jitted, np.float32), np.asarray(x_ours, np.float32), rtol=0,
                                   atol=float(np.spacing(np.asarray(x_in, jitted.dtype))))


# ------------------------------------------------------------------------------------------------
# Latent packing and ids
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,c,h,w", [(1, 16, 8, 12), (2, 16, 16, 6), (3, 4, 2, 2)])
def test_pack_unpack_match_diffusers(b, c, h, w):
    x = torch.randn(b, c, h, w)
    ref = FluxPipeline._pack_latents(x, b, c, h, w)
    ours = pack_latents(jnp.asarray(x.numpy()))
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    y = torch.randn(*ref.shape)
    height, width = h * 8, w * 8
    ref_un = FluxPipeline._unpack_latents(y, height, width, 8)
    ours_un = unpack_latents(jnp.asarray(y.numpy()), height, width)
    np.testing.assert_array_equal(np.asarray(ours_un), ref_un.numpy())
    np.testing.assert_array_equal(np.asarray(unpack_latents(ours, height, width)), x.numpy())
    assert latent_size(height, width) == (h, w) and packed_seq_len(height, width) == (h // 2) * (w // 2)


@pytest.mark.parametrize("h,w", [(4, 6), (1, 1), (32, 16)])
def test_img_ids_match_diffusers(h, w):
    ref = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
    np.testing.assert_array_equal(np.asarray(prepare_img_ids(h, w)), ref.numpy())
    np.testing.assert_array_equal(np.asarray(prepare_txt_ids(5)), np.zeros((5, 3), np.float32))


def test_latent_size_rejects_bad_image_sizes():
    assert latent_size(1024, 768) == (128, 96)
    for hw in ((100, 64), (64, 1000), (8, 16)):
        with pytest.raises(ValueError, match="not divisible by 16"):
            latent_size(*hw)
    with pytest.raises(ValueError, match="positive integer"):
        latent_size(0, 64)


# ------------------------------------------------------------------------------------------------
# The jitted loop with a toy transformer (fast; checks plumbing, dtypes, retracing, progress)
# ------------------------------------------------------------------------------------------------

TRACES = []


def toy_forward(config, params, *, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                img_ids, txt_ids, guidance=None):
    """A cheap stand-in for the transformer that depends on every input; records its traces."""
    TRACES.append(hidden_states.shape)
    dt = hidden_states.dtype
    h = hidden_states @ params["w"].astype(dt) + timestep.astype(dt)[:, None, None] * params["a"].astype(dt)
    h = h + (encoder_hidden_states.mean(1) @ params["e"].astype(dt) + pooled_projections @ params["p"].astype(dt))[:, None]
    h = h + (img_ids @ params["i"]).astype(dt)[None] + txt_ids.sum() * params["a"].astype(dt)
    if guidance is not None:
        h = h + guidance.astype(dt)[:, None, None] * 1000 / 3000 * params["a"].astype(dt)
    return jnp.tanh(h)


def toy_forward_torch(p, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance=None):
    dt = hidden_states.dtype
    h = hidden_states @ p["w"].to(dt) + timestep.to(dt)[:, None, None] * p["a"].to(dt)
    h = h + (encoder_hidden_states.mean(1) @ p["e"].to(dt) + pooled_projections @ p["p"].to(dt))[:, None]
    h = h + (img_ids @ p["i"]).to(dt)[None] + txt_ids.sum() * p["a"].to(dt)
    if guidance is not None:
        h = h + guidance.to(dt)[:, None, None] * 1000 / 3000 * p["a"].to(dt)
    return torch.tanh(h)


def flux_pipeline_loop_torch(p, guidance_embeds, sched_config, latents, prompt_embeds, pooled, img_ids,
                             num_steps, guidance_scale):
    """FluxPipeline.__call__'s denoising loop, line for line, around the toy transformer."""
    sched, timesteps, _ = diffusers_schedule(sched_config, num_steps, latents.shape[1])
    timesteps = torch.from_numpy(timesteps)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)
    guidance = torch.full([1], guidance_scale, dtype=torch.float32).expand(latents.shape[0]) if guidance_embeds else None
    sched.set_begin_index(0)
    for t in timesteps:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        noise_pred = toy_forward_torch(p, latents, prompt_embeds, pooled, timestep / 1000, img_ids, text_ids, guidance)
        latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(3)
    C, J, P = 16, 8, 8
    p = {"w": rng.normal(0, 0.3, (C, C)), "a": rng.normal(0, 1, (C,)), "e": rng.normal(0, 0.3, (J, C)),
         "p": rng.normal(0, 0.3, (P, C)), "i": rng.normal(0, 0.1, (3, C))}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    cfg = lambda g: FluxConfig(in_channels=C, joint_attention_dim=J, pooled_projection_dim=P, guidance_embeds=g,
                               num_layers=0, num_single_layers=0)
    return p, cfg


@pytest.mark.parametrize("guidance_embeds,sched_config", [(True, FLUX_DEV_SCHEDULER), (False, FLUX_SCHNELL_SCHEDULER)])
def test_loop_matches_flux_pipeline_loop_toy(toy, guidance_embeds, sched_config):
    p, cfg = toy
    config = cfg(guidance_embeds)
    rng = np.random.default_rng(4)
    B, height, width = 2, 48, 80
    n_img = packed_seq_len(height, width)
    lat = rng.standard_normal((B, n_img, 16)).astype(np.float32)
    enc = rng.standard_normal((B, 5, 8)).astype(np.float32)
    pooled = rng.standard_normal((B, 8)).astype(np.float32)
    h_lat, w_lat = latent_size(height, width)
    ids = FluxPipeline._prepare_latent_image_ids(B, h_lat // 2, w_lat // 2, "cpu", torch.float32)
    ref = flux_pipeline_loop_torch({k: torch.from_numpy(v) for k, v in p.items()}, guidance_embeds, sched_config,
                                   torch.from_numpy(lat), torch.from_numpy(enc), torch.from_numpy(pooled), ids,
                                   num_steps=5, guidance_scale=4.0)
    ours = sample(config, jax.tree.map(jnp.asarray, p), latents=lat, encoder_hidden_states=enc,
                  pooled_projections=pooled, num_inference_steps=5, guidance_scale=4.0,
                  scheduler_config=FlowMatchConfig.from_diffusers_config(sched_config), forward_fn=toy_forward,
                  height=height, width=width)
    assert ours.shape == lat.shape and ours.dtype == jnp.float32
    ref = ref.numpy()
    assert np.abs(ref - lat).max() > 0.5  # the loop really moved the latents
    # toy step: a K=16 matmul, a mean over 5 tokens, tanh, the Euler update: 3 reductions per step, 5 steps
    assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() <= fp32_bound(16, 3 * 5)


def test_loop_bf16_and_no_retrace(toy):
    """bf16 latents stay bf16 and track the torch loop; new guidance/sigmas/ids values reuse the compiled loop."""
    p, cfg = toy
    config = cfg(True)
    rng = np.random.default_rng(5)
    lat = rng.standard_normal((1, 12, 16)).astype(np.float32)
    enc = rng.standard_normal((1, 5, 8)).astype(np.float32)
    pooled = rng.standard_normal((1, 8)).astype(np.float32)
    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    ref = flux_pipeline_loop_torch({k: torch.from_numpy(v) for k, v in p.items()}, True, FLUX_DEV_SCHEDULER,
                                   torch.from_numpy(lat).bfloat16(), torch.from_numpy(enc).bfloat16(),
                                   torch.from_numpy(pooled).bfloat16(), ids, num_steps=3, guidance_scale=3.5)
    pj = jax.tree.map(jnp.asarray, p)
    kw = dict(encoder_hidden_states=jnp.asarray(enc, jnp.bfloat16), pooled_projections=jnp.asarray(pooled, jnp.bfloat16),
              num_inference_steps=3, forward_fn=toy_forward)
    TRACES.clear()
    ours = sample(config, pj, latents=jnp.asarray(lat, jnp.bfloat16), height=48, width=64, **kw)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref.float().numpy(), rtol=0, atol=0.05)
    n_traces = len(TRACES)
    assert n_traces >= 1
    sample(config, pj, latents=jnp.asarray(lat, jnp.bfloat16), height=48, width=64, guidance_scale=1.5, **kw)
    sample(config, pj, latents=jnp.asarray(lat, jnp.bfloat16), img_ids=prepare_img_ids(4, 3), **kw,
           sigmas=[1.0, 0.5, 0.2])
    assert len(TRACES) == n_traces  # schedule, guidance and positions are array inputs: no retrace


def test_progress_callback(toy, caplog):
    p, cfg = toy
    calls = []

    def cb(step, num_steps):
        calls.append((step, num_steps))

    lat = np.zeros((1, 4, 16), np.float32)
    with caplog.at_level(logging.INFO, logger="pqjax"):
        out = sample(cfg(False), jax.tree.map(jnp.asarray, p), latents=lat,
                     encoder_hidden_states=np.ones((1, 2, 8), np.float32),
                     pooled_projections=np.ones((1, 8), np.float32), num_inference_steps=4, forward_fn=toy_forward,
                     height=32, width=32, progress=True, callback=cb, scheduler_config=FlowMatchConfig.flux_schnell())
        jax.block_until_ready(out)
        jax.effects_barrier()
    assert sorted(calls) == [(i, 4) for i in range(1, 5)]
    # one summary line: the first step (which includes compiling the loop) apart from the steady-state rate
    assert "sample: 4 steps, step 1 " in caplog.text and "(incl. compile), then " in caplog.text


def test_bad_inputs_raise_clear_errors(toy):
    p, cfg = toy
    config = cfg(True)
    lat = np.zeros((1, 12, 16), np.float32)
    kw = dict(encoder_hidden_states=np.zeros((1, 5, 8), np.float32), pooled_projections=np.zeros((1, 8), np.float32),
              num_inference_steps=2, forward_fn=toy_forward)
    with pytest.raises(ValueError, match="height=50 is not divisible by 16"):
        sample(config, p, latents=lat, height=50, width=64, **kw)
    with pytest.raises(ValueError, match="width=60 is not divisible by 16"):
        sample(config, p, latents=lat, height=48, width=60, **kw)
    with pytest.raises(ValueError, match="config.in_channels=16"):
        sample(config, p, latents=np.zeros((1, 12, 64), np.float32), height=48, width=64, **kw)
    with pytest.raises(ValueError, match="packed"):
        sample(config, p, latents=np.zeros((1, 4, 6, 8), np.float32), height=48, width=64, **kw)
    with pytest.raises(ValueError, match="12 image tokens but a 64x64 image has 16"):
        sample(config, p, latents=lat, height=64, width=64, **kw)
    with pytest.raises(ValueError, match="give the image size"):
        sample(config, p, latents=lat, **kw)
    with pytest.raises(ValueError, match="img_ids must be"):
        sample(config, p, latents=lat, img_ids=np.zeros((10, 3)), **kw)
    with pytest.raises(ValueError, match="batch sizes differ"):
        sample(config, p, latents=np.zeros((2, 12, 16), np.float32), height=48, width=64, **kw)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        sample(config, p, latents=lat, height=48, width=64, **{**kw, "encoder_hidden_states": np.zeros((1, 5, 7))})


# ------------------------------------------------------------------------------------------------
# End to end: a tiny random FluxPipeline (torch fp32) vs the jitted sampler on the same weights
# ------------------------------------------------------------------------------------------------

TINY = dict(num_attention_heads=2, attention_head_dim=64, axes_dims_rope=(8, 28, 28), in_channels=64,
            joint_attention_dim=64, pooled_projection_dim=64, num_layers=2, num_single_layers=2)


def torch_to_params(module: torch.nn.Module) -> dict:
    """diffusers state dict -> nested params (Linear weight.T -> kernel, 1-D norm weight -> scale)."""
    params: dict = {}
    for name, t in module.state_dict().items():
        *path, leaf = name.split(".")
        a = t.detach().float().numpy()
        if leaf == "weight":
            leaf, a = ("kernel", a.T) if a.ndim == 2 else ("scale", a)
        d = params
        for key in path:
            d = d.setdefault(key, {})
        d[leaf] = jnp.asarray(a)
    return params


def tiny_flux_pipeline(guidance_embeds: bool, sched_config: dict, seed: int) -> FluxPipeline:
    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=64, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    tokenizer_2 = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("▁b", -1.0)])
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=8, d_model=64, d_ff=64, d_kv=16, num_layers=1,
                                             num_heads=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                        layers_per_block=1, latent_channels=16, norm_num_groups=2).eval()
    transformer = FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds).eval()
    with torch.no_grad():  # randomize everything (no zero-init biases / unit norms left)
        for name, prm in transformer.named_parameters():
            if prm.ndim == 1 and "norm" in name and "linear" not in name:
                prm.copy_(1 + 0.1 * torch.randn_like(prm))
            else:
                prm.normal_(0, 0.05)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_config), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    return pipe


@pytest.fixture(scope="module", params=["dev", "schnell"])
def tiny_pipe(request):
    dev = request.param == "dev"
    sched_config = FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER
    pipe = tiny_flux_pipeline(dev, sched_config, seed=10 + dev)
    config = FluxConfig.from_dict(dict(pipe.transformer.config))
    params = torch_to_params(pipe.transformer)
    assert jax.tree.structure(params) == jax.tree.structure(flux.param_shapes(config))
    return pipe, config, params, FlowMatchConfig.from_diffusers_config(dict(pipe.scheduler.config))


@pytest.mark.parametrize("batch", [1, 2])
def test_sample_matches_flux_pipeline(tiny_pipe, batch):
    pipe, config, params, sched_cfg = tiny_pipe
    height, width, n_txt = 64, 96, 7
    h_lat, w_lat = latent_size(height, width)
    gen = torch.Generator().manual_seed(100 + batch + 10 * config.guidance_embeds)
    noise = torch.randn(batch, 16, h_lat, w_lat, generator=gen)
    prompt_embeds = torch.randn(batch, n_txt, 64, generator=gen)
    pooled = torch.randn(batch, 64, generator=gen)
    latents = FluxPipeline._pack_latents(noise, batch, 16, h_lat, w_lat)

    ref = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, latents=latents, num_inference_steps=4,
               guidance_scale=3.5, output_type="latent", height=height, width=width).images.numpy()

    packed = pack_latents(jnp.asarray(noise.numpy()))
    np.testing.assert_array_equal(np.asarray(packed), latents.numpy())
    ours = np.asarray(sample(config, params, latents=packed, encoder_hidden_states=jnp.asarray(prompt_embeds.numpy()),
                             pooled_projections=jnp.asarray(pooled.numpy()), num_inference_steps=4,
                             guidance_scale=3.5, scheduler_config=sched_cfg, height=height, width=width))
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    moved = np.abs(ref - latents.numpy()).max() / np.abs(ref).max()
    print(f"\n[{'dev' if config.guidance_embeds else 'schnell'} B={batch}] rel err {err:.2e}, "
          f"latents moved {moved:.2f}")
    assert moved > 0.05, "the tiny model barely changes the latents: the test would not be sensitive"
    bound = fp32_bound(flux_k(config.inner_dim, 24 + n_txt), 4 * flux_depth(config.num_layers, config.num_single_layers))
    assert err <= bound
    np.testing.assert_allclose(np.asarray(unpack_latents(jnp.asarray(ours), height, width)),
                               FluxPipeline._unpack_latents(torch.from_numpy(ref), height, width, 8).numpy(),
                               rtol=0, atol=bound * np.abs(ref).max())


def test_sample_bf16_tracks_fp32(tiny_pipe):
    """bf16 params + latents run the same compiled-loop code path, stay bf16 and stay near the fp32 result."""
    pipe, config, params, sched_cfg = tiny_pipe
    rng = np.random.default_rng(7)
    lat = rng.standard_normal((1, 24, 64)).astype(np.float32)
    enc = rng.standard_normal((1, 7, 64)).astype(np.float32)
    pooled = rng.standard_normal((1, 64)).astype(np.float32)
    kw = dict(num_inference_steps=3, scheduler_config=sched_cfg, height=64, width=96)
    ref = np.asarray(sample(config, params, latents=lat, encoder_hidden_states=enc, pooled_projections=pooled, **kw))
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = sample(config, jax.tree.map(bf, params), latents=bf(lat), encoder_hidden_states=bf(enc),
                 pooled_projections=bf(pooled), **kw)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    print(f"\n[bf16 vs fp32 sampler] rel err {err:.2e}")
    assert err < 5e-2, err
