"""Time per stage (encode, denoise per step, decode) and memory of the JAX FLUX pipeline on random weights.

    python examples/bench_pipeline.py [--size mid|small] [--height 256] [--width 256] [--steps 4] [--batch 1]
                                      [--txt 128] [--dtype float32|bfloat16]

Not a test: prints a table. The pipeline is FLUX-shaped (CLIP -> T5 -> transformer -> VAE) but mid-sized so it
runs on a CPU; weights are random (JAX init, no download, no torch), tokenizers are tiny letter-level ones built
in memory (transformers). Components load lazily and the text encoders are released after encoding, exactly as
``pqjax.pipeline.text_to_image`` / ``pqjax sample`` do, so the resident-memory column shows the encoders' weights
leaving before the transformer's arrive. Each stage runs once to compile (and load), then is timed on a second run.
"""
import argparse
import gc
import math
import string
import sys
import time

import jax
import jax.numpy as jnp

from converters.pipeline_components import FluxPipelineComponents, LazyComponent
from pqjax.models import clip, flux, t5, vae
from pqjax.models.common import random_params
from pqjax.models.flux import FluxConfig
from pqjax.pipeline import FlowMatchConfig, Tokenizer, decode_images, encode_prompts, text_to_image

SIZES = {
    # CLIP width = pooled_projection_dim; T5 width = joint_attention_dim (as in FLUX: 768 and 4096)
    "mid": dict(clip=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
                t5=dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=6, num_heads=16),
                flux=dict(num_attention_heads=6, attention_head_dim=128, num_layers=2, num_single_layers=4),
                vae=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32)),
    "small": dict(clip=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
                  t5=dict(d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8),
                  flux=dict(num_attention_heads=2, attention_head_dim=128, num_layers=1, num_single_layers=2),
                  vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32)),
}


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux /proc)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals.get("VmRSS", float("nan")), vals.get("VmHWM", float("nan"))


def live_mib() -> float:
    """MiB held by live JAX arrays (weights + activations kept alive); RSS alone hides frees behind the allocator."""
    return sum(a.nbytes for a in jax.live_arrays()) / 2**20


PEAK_LIVE = [0.0]


def note_live():
    PEAK_LIVE[0] = max(PEAK_LIVE[0], live_mib())


def tree_mib(tree) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def letter_tokenizers():
    from transformers import CLIPTokenizer, T5TokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    t5_vocab += [("\u2581" + c, -2.0) for c in string.ascii_lowercase] + [(c, -3.0) for c in string.ascii_lowercase]
    a = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    b = T5TokenizerFast(vocab=t5_vocab, extra_ids=0)
    return (Tokenizer("<memory>/tokenizer", a, "transformers", a.vocab_size, a.model_max_length),
            Tokenizer("<memory>/tokenizer_2", b, "transformers", b.vocab_size, b.model_max_length))


def random_pipeline(size: str, dtype) -> FluxPipelineComponents:
    s = SIZES[size]
    cc = clip.CLIPTextConfig(vocab_size=1000, max_position_embeddings=77, **s["clip"])
    tc = t5.T5EncoderConfig(vocab_size=1000, **s["t5"])
    fc = FluxConfig(in_channels=64, joint_attention_dim=tc.d_model, pooled_projection_dim=cc.hidden_size,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56), **s["flux"])
    vc = vae.VAEConfig(**s["vae"])
    keys = jax.random.split(jax.random.key(0), 4)
    tok, tok2 = letter_tokenizers()

    def lazy(name, cfg, init):
        def load():  # "loading" = a random init; the peak of live arrays is sampled right after
            params = init()
            note_live()
            return params
        return LazyComponent(name, "<random>", cfg, load)

    return FluxPipelineComponents(
        path="<random>", dtype=dtype, tokenizer=tok, tokenizer_2=tok2,
        text_encoder=lazy("text_encoder", cc, lambda: clip.init_params(cc, keys[0], dtype)),
        text_encoder_2=lazy("text_encoder_2", tc, lambda: t5.init_params(tc, keys[1], dtype)),
        # flux.init_params draws with eager jax.random (a compile per shape); numpy is much faster here
        transformer=lazy("transformer", fc, lambda: random_params(flux.param_layout(fc), keys[2], dtype)),
        vae=lazy("vae", vc, lambda: vae.init_params(vc, keys[3], jnp.float32)),
        scheduler_config=FlowMatchConfig())


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--txt", type=int, default=128, help="T5 max_sequence_length")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args(argv)
    dtype = getattr(jnp, args.dtype)
    pipe = random_pipeline(args.size, dtype)
    prompts = [f"a photo of a {w} on a sunny day" for w in ("cat", "dog", "house", "tree", "boat")][:args.batch]
    prompts += ["a photo"] * (args.batch - len(prompts))
    common = dict(num_inference_steps=args.steps, height=args.height, width=args.width, seed=0)

    rows = []

    def row(stage, first, steady, params_mib, note=""):
        note_live()
        rows.append((stage, first, steady, params_mib, live_mib(), rss_mib()[1], note))

    base_cur, _ = rss_mib()
    # 1. encode: first run loads + compiles; the timed run reuses both; then both encoders are released
    encode = lambda: encode_prompts(pipe, prompts, max_sequence_length=args.txt)
    _, first = timed(lambda: encode().prompt_embeds)
    enc_mib = tree_mib(pipe.text_encoder.params) + tree_mib(pipe.text_encoder_2.params)
    t0 = time.perf_counter()
    emb = encode()
    jax.block_until_ready((emb.prompt_embeds, emb.pooled_prompt_embeds))
    steady = time.perf_counter() - t0
    row("encode (CLIP+T5)", first, steady, enc_mib, "first: load + compile")
    pipe.release("text_encoder", "text_encoder_2")
    gc.collect()
    row("  release encoders", float("nan"), float("nan"), 0.0)

    # 2. denoise: the whole jitted loop; per step = loop time / steps
    _, first = timed(lambda: text_to_image(pipe, embeddings=emb, output_type="latent", **common))
    lat, steady = timed(lambda: text_to_image(pipe, embeddings=emb, output_type="latent", **common))
    row(f"denoise per step (x{args.steps})", first / args.steps, steady / args.steps,
        tree_mib(pipe.transformer.params), "first: load + compile, per step")

    # 3. decode
    _, first = timed(lambda: decode_images(pipe.vae.config, pipe.vae.params, lat, args.height, args.width))
    _, steady = timed(lambda: decode_images(pipe.vae.config, pipe.vae.params, lat, args.height, args.width))
    row("decode (VAE)", first, steady, tree_mib(pipe.vae.params), "first: load + compile")

    fc, n_img = pipe.transformer.config, (args.height // 16) * (args.width // 16)
    print(f"device: {jax.devices()[0].device_kind}; dtype {args.dtype}; size {args.size}; batch {args.batch}; "
          f"{args.height}x{args.width} ({n_img} image tokens) + {args.txt} text tokens; transformer D={fc.inner_dim} "
          f"double={fc.num_layers} single={fc.num_single_layers}; process RSS before: {base_cur:.0f} MiB")
    print(f"{'stage':<26} {'first s':>8} {'steady s':>9} {'params MiB':>11} {'live MiB':>9} {'peak RSS':>9}  note")
    for stage, first, steady, mib, live, peak, note in rows:
        f = "" if math.isnan(first) else f"{first:.3f}"
        s = "" if math.isnan(steady) else f"{steady:.3f}"
        print(f"{stage:<26} {f:>8} {s:>9} {mib:>11.1f} {live:>9.1f} {peak:>9.0f}  {note}")
    weights = {n: r[3] for n, r in zip(("enc", "rel", "tr", "vae"), rows)}
    print(f"peak live JAX arrays: {PEAK_LIVE[0]:.1f} MiB; encoders {weights['enc']:.1f} + transformer "
          f"{weights['tr']:.1f} + VAE {weights['vae']:.1f} MiB of weights (encoders released before the transformer "
          f"loads: the peak tracks max(encoders, transformer) + VAE, not the sum)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
