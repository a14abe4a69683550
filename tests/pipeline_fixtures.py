"""Tiny FLUX pipeline components built offline (torch CPU, every parameter randomized) and their tokenizers.

    clip = make_clip(seed=0)                     # transformers CLIPTextModel, eval mode
    t5 = make_t5(seed=1)                         # transformers T5EncoderModel (v1.1: gated-gelu)
    vae = make_vae(seed=2)                       # diffusers AutoencoderKL with FLUX's scaling/shift factors
    pipe, path = make_pipeline(tmp_dir, seed=3)  # a whole FluxPipeline, saved with save_pretrained
"""
from __future__ import annotations

import math
import string

#: The tiny tokenizers spell words letter by letter (CLIP: "c", "a", "t</w>"; T5: "\u2581c", "a", "t"), so
#: prompts give long, varied id sequences from a small vocabulary.
LETTERS = string.ascii_lowercase
CLIP_VOCAB_SIZE = 2 + 2 * len(LETTERS) + 4   # embedding rows (a few unused, like real checkpoints)
T5_VOCAB_SIZE = 3 + 2 * len(LETTERS) + 5
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)


def randomize_(module, seed: int):
    """Every parameter gets fresh noise, so a swapped name or a missing transpose cannot hide.

    Weights (>= 2-D) N(0, 1/fan_in); 1-D ``weight`` (norm scales) 1 + N(0, 0.2^2); biases N(0, 0.1^2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def make_clip_tokenizer(model_max_length: int = 77):
    """CLIP BPE tokenizer without merges: ids 0 = BOS, 1 = EOS (= pad = unk), then letters, then "letter</w>"."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in LETTERS:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def make_t5_tokenizer():
    """Unigram T5 tokenizer: 0 = <pad>, 1 = </s>, 2 = <unk>, then "\u2581letter", then letters."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -2.0) for c in LETTERS] + [(c, -3.0) for c in LETTERS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def make_clip(seed: int = 0, *, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
              eos_token_id: int = 1, vocab_size: int = CLIP_VOCAB_SIZE, max_position_embeddings: int = 77, **kw):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=96,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         max_position_embeddings=max_position_embeddings, projection_dim=hidden_size,
                         bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1, **kw)
    return randomize_(CLIPTextModel(cfg), seed)


def make_t5(seed: int = 1, *, d_model: int = 64, num_layers: int = 2, feed_forward_proj: str = "gated-gelu",
            vocab_size: int = T5_VOCAB_SIZE, **kw):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=96, num_layers=num_layers, num_heads=4,
                   feed_forward_proj=feed_forward_proj, **kw)
    return randomize_(T5EncoderModel(cfg), seed)


def make_vae(seed: int = 2, *, block_out_channels=(8, 16, 32, 32), layers_per_block: int = 1,
             use_quant_conv: bool = False, **kw):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                          up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                          layers_per_block=layers_per_block, latent_channels=16, norm_num_groups=4,
                          use_quant_conv=use_quant_conv, use_post_quant_conv=use_quant_conv,
                          **{**FLUX_VAE_FACTORS, **kw})
    return randomize_(model, seed)


def make_pipeline(root, seed: int = 3, *, guidance_embeds: bool = True, vae_blocks=(8, 16, 32, 32)):
    """A whole tiny FluxPipeline (FLUX.1-dev-like scheduler), saved under ``root``; returns (pipe, path).
    ``vae_blocks``: the VAE's block_out_channels (its scale factor is 2 ** (len - 1); FLUX's is 8)."""
    import os

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from flux_fixtures import make_diffusers_model

    sched = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": guidance_embeds}
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched), vae=make_vae(seed + 1, block_out_channels=vae_blocks),
                        text_encoder=make_clip(seed + 2), tokenizer=make_clip_tokenizer(),
                        text_encoder_2=make_t5(seed + 3), tokenizer_2=make_t5_tokenizer(),
                        transformer=make_diffusers_model(seed + 4, guidance_embeds=guidance_embeds))
    pipe.set_progress_bar_config(disable=True)
    path = os.path.join(os.fspath(root), "pipeline")
    pipe.save_pretrained(path)
    return pipe, path
