"""FLUX's VAE (diffusers' ``AutoencoderKL``): decoder and encoder as pure JAX functions.

Public functions take and return NCHW arrays like diffusers; inside, activations are NHWC (XLA's preferred conv
layout). Parameters are keyed like the diffusers state dict, e.g.
``params["decoder"]["up_blocks"]["0"]["resnets"]["1"]["conv1"]["kernel"]``: Conv2d ``{"kernel": [kh, kw, in, out],
"bias"}`` (Flax HWIO layout), GroupNorm ``{"scale", "bias"}``, the mid-block attention's Linear ``{"kernel": [in, out],
"bias"}``.

FLUX's transformer works in *scaled* latents: ``z_vae = z / scaling_factor + shift_factor`` before :func:`decode`
(:func:`decode_latents` does both), ``z = (z_vae - shift_factor) * scaling_factor`` after :func:`encode`
(:func:`encode_image`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from pqjax.models.common import random_params
from pqjax.models.layers import attention, dense

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """``AutoencoderKL`` config fields (defaults: FLUX.1's ``vae/config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"VAEConfig: act_fn {self.act_fn!r} is not supported (FLUX's VAE uses 'silu')")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig: block_out_channels {self.block_out_channels} must be multiples of "
                             f"norm_num_groups={self.norm_num_groups}")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel: ``2 ** (len(block_out_channels) - 1)`` (8 for FLUX)."""
        return 2 ** (len(self.block_out_channels) - 1)

    _BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """From a diffusers ``vae/config.json`` dict; missing keys take ``AutoencoderKL``'s class defaults."""
        n = len(d.get("block_out_channels") or (64,))
        for key, kind in cls._BLOCKS.items():
            types = tuple(d.get(key) or (kind,) * n)
            if types != (kind,) * n:
                raise ValueError(f"VAEConfig: {key}={list(types)} is not supported (expected {n} x {kind!r})")
        diffusers_defaults = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
                                  shift_factor=None, use_quant_conv=True, use_post_quant_conv=True,
                                  mid_block_add_attention=True, force_upcast=True)
        fields = {k: d.get(k, v) for k, v in diffusers_defaults.items()}
        for k in ("latents_mean", "latents_std"):
            if d.get(k) is not None:
                raise ValueError(f"VAEConfig: {k} is set; per-channel latent statistics are not supported (FLUX uses "
                                 "scaling_factor and shift_factor)")
        return cls(**fields)


# ----------------------------------------------------------------------------------------------
# Parameter layout
# ----------------------------------------------------------------------------------------------

def _conv(c_in: int, c_out: int, k: int = 3) -> dict[str, tuple[int, ...]]:
    return {"kernel": (k, k, c_in, c_out), "bias": (c_out,)}


def _norm(c: int) -> dict[str, tuple[int, ...]]:
    return {"scale": (c,), "bias": (c,)}


def _resnet(c_in: int, c_out: int) -> Params:
    p = {"norm1": _norm(c_in), "conv1": _conv(c_in, c_out), "norm2": _norm(c_out), "conv2": _conv(c_out, c_out)}
    if c_in != c_out:
        p["conv_shortcut"] = _conv(c_in, c_out, 1)
    return p


def _mid_block(c: int, attn: bool) -> Params:
    p: Params = {"resnets": {"0": _resnet(c, c), "1": _resnet(c, c)}}
    if attn:
        lin = {"kernel": (c, c), "bias": (c,)}
        p["attentions"] = {"0": {"group_norm": _norm(c), "to_q": lin, "to_k": lin, "to_v": lin, "to_out": {"0": lin}}}
    return p


def param_layout(config: VAEConfig) -> Params:
    """Nested dict of parameter shapes (tuples), keyed like ``AutoencoderKL``'s state dict."""
    c, ch = config, config.block_out_channels
    down = {}
    for i, c_out in enumerate(ch):
        c_in = ch[max(i - 1, 0)]
        blk: Params = {"resnets": {str(j): _resnet(c_in if j == 0 else c_out, c_out) for j in range(c.layers_per_block)}}
        if i < len(ch) - 1:
            blk["downsamplers"] = {"0": {"conv": _conv(c_out, c_out)}}
        down[str(i)] = blk
    up = {}
    rev = list(reversed(ch))
    for i, c_out in enumerate(rev):
        c_in = rev[max(i - 1, 0)]
        blk = {"resnets": {str(j): _resnet(c_in if j == 0 else c_out, c_out) for j in range(c.layers_per_block + 1)}}
        if i < len(ch) - 1:
            blk["upsamplers"] = {"0": {"conv": _conv(c_out, c_out)}}
        up[str(i)] = blk
    out: Params = {
        "encoder": {"conv_in": _conv(c.in_channels, ch[0]), "down_blocks": down,
                    "mid_block": _mid_block(ch[-1], c.mid_block_add_attention),
                    "conv_norm_out": _norm(ch[-1]), "conv_out": _conv(ch[-1], 2 * c.latent_channels)},
        "decoder": {"conv_in": _conv(c.latent_channels, ch[-1]),
                    "mid_block": _mid_block(ch[-1], c.mid_block_add_attention), "up_blocks": up,
                    "conv_norm_out": _norm(ch[0]), "conv_out": _conv(ch[0], c.out_channels)},
    }
    if c.use_quant_conv:
        out["quant_conv"] = _conv(2 * c.latent_channels, 2 * c.latent_channels, 1)
    if c.use_post_quant_conv:
        out["post_quant_conv"] = _conv(c.latent_channels, c.latent_channels, 1)
    return out


def init_params(config: VAEConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std), unit GroupNorm scales): for benchmarks and demos."""
    return random_params(param_layout(config), key, dtype, std)


# ----------------------------------------------------------------------------------------------
# Layers (NHWC)
# ----------------------------------------------------------------------------------------------

_EPS = 1e-6  # every GroupNorm of the VAE (resnets, attention, conv_norm_out)


def conv2d(p: dict, x: jax.Array, stride: int = 1, padding="SAME_TORCH") -> jax.Array:
    """``nn.Conv2d`` on NHWC; ``padding`` is torch's symmetric ``k // 2`` unless explicit ``((t, b), (l, r))``."""
    k = p["kernel"].shape[0]
    if padding == "SAME_TORCH":
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    y = jax.lax.conv_general_dilated(x, p["kernel"].astype(x.dtype), (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32)
    return (y + p["bias"].astype(jnp.float32)).astype(x.dtype)


def group_norm(p: dict, x: jax.Array, groups: int, eps: float = _EPS) -> jax.Array:
    """``nn.GroupNorm(groups, C, eps)`` on NHWC, statistics in fp32."""
    B, H, W, C = x.shape
    xf = x.astype(jnp.float32).reshape(B, H, W, groups, C // groups)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(B, H, W, C)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _resnet_block(c: VAEConfig, p: Params, x: jax.Array) -> jax.Array:
    h = conv2d(p["conv1"], jax.nn.silu(group_norm(p["norm1"], x, c.norm_num_groups)))
    h = conv2d(p["conv2"], jax.nn.silu(group_norm(p["norm2"], h, c.norm_num_groups)))
    if "conv_shortcut" in p:
        x = conv2d(p["conv_shortcut"], x)
    return x + h


def _attention_block(c: VAEConfig, p: Params, x: jax.Array) -> jax.Array:
    """diffusers' ``Attention`` of the mid block: one head over all H*W positions, residual."""
    B, H, W, C = x.shape
    h = group_norm(p["group_norm"], x, c.norm_num_groups).reshape(B, H * W, 1, C)
    o = attention(dense(p["to_q"], h), dense(p["to_k"], h), dense(p["to_v"], h))
    return x + dense(p["to_out"]["0"], o.reshape(B, H * W, C)).reshape(B, H, W, C)


def _mid(c: VAEConfig, p: Params, x: jax.Array) -> jax.Array:
    x = _resnet_block(c, p["resnets"]["0"], x)
    if "attentions" in p:
        x = _attention_block(c, p["attentions"]["0"], x)
    return _resnet_block(c, p["resnets"]["1"], x)


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _nchw_to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------
# Decoder / encoder
# ----------------------------------------------------------------------------------------------

def _dtype(params: Params):
    return params["decoder"]["conv_in"]["kernel"].dtype if "decoder" in params else params["encoder"]["conv_in"]["kernel"].dtype


def decode(config: VAEConfig, params: Params, z: jax.Array) -> jax.Array:
    """``AutoencoderKL.decode(z).sample``: VAE-space latents ``[B, latent_channels, h, w]`` -> image
    ``[B, out_channels, h*8, w*8]`` (nominally in [-1, 1]). Runs in the parameters' dtype."""
    c = config
    if z.ndim != 4 or z.shape[1] != c.latent_channels:
        raise ValueError(f"vae.decode: z must be [B, {c.latent_channels}, h, w] (NCHW), got shape {tuple(z.shape)}")
    x = _nchw_to_nhwc(jnp.asarray(z).astype(_dtype(params)))
    if c.use_post_quant_conv:
        x = conv2d(params["post_quant_conv"], x)
    p = params["decoder"]
    x = conv2d(p["conv_in"], x)
    x = _mid(c, p["mid_block"], x)
    for i in range(len(c.block_out_channels)):
        blk = p["up_blocks"][str(i)]
        for j in range(c.layers_per_block + 1):
            x = _resnet_block(c, blk["resnets"][str(j)], x)
        if "upsamplers" in blk:
            x = conv2d(blk["upsamplers"]["0"]["conv"], _upsample_nearest(x))
    x = conv2d(p["conv_out"], jax.nn.silu(group_norm(p["conv_norm_out"], x, c.norm_num_groups)))
    return _nhwc_to_nchw(x)


def encode(config: VAEConfig, params: Params, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``AutoencoderKL.encode(image).latent_dist`` as ``(mean, logvar)``, each ``[B, latent_channels, H/8, W/8]``
    (logvar clamped to [-30, 20] like diffusers). ``image`` is ``[B, in_channels, H, W]`` in [-1, 1]."""
    c = config
    f = c.scale_factor
    if image.ndim != 4 or image.shape[1] != c.in_channels:
        raise ValueError(f"vae.encode: image must be [B, {c.in_channels}, H, W] (NCHW), got shape {tuple(image.shape)}")
    if image.shape[2] % f or image.shape[3] % f:
        raise ValueError(f"vae.encode: image height and width must be multiples of {f}, got {image.shape[2]}x{image.shape[3]}")
    x = _nchw_to_nhwc(jnp.asarray(image).astype(_dtype(params)))
    p = params["encoder"]
    x = conv2d(p["conv_in"], x)
    for i in range(len(c.block_out_channels)):
        blk = p["down_blocks"][str(i)]
        for j in range(c.layers_per_block):
            x = _resnet_block(c, blk["resnets"][str(j)], x)
        if "downsamplers" in blk:  # diffusers pads (0, 1, 0, 1) then convolves 3x3 with stride 2, no padding
            x = conv2d(blk["downsamplers"]["0"]["conv"], x, stride=2, padding=((0, 1), (0, 1)))
    x = _mid(c, p["mid_block"], x)
    x = conv2d(p["conv_out"], jax.nn.silu(group_norm(p["conv_norm_out"], x, c.norm_num_groups)))
    if c.use_quant_conv:
        x = conv2d(params["quant_conv"], x)
    mean, logvar = jnp.split(_nhwc_to_nchw(x), 2, axis=1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def decode_latents(config: VAEConfig, params: Params, latents: jax.Array) -> jax.Array:
    """FLUX-scaled latents ``[B, C, h, w]`` -> image in [-1, 1]: ``decode(latents / scaling_factor + shift_factor)``."""
    z = jnp.asarray(latents) / config.scaling_factor + (config.shift_factor or 0.0)
    return decode(config, params, z)


def encode_image(config: VAEConfig, params: Params, image: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Image in [-1, 1] ``[B, 3, H, W]`` -> FLUX-scaled latents ``(z - shift_factor) * scaling_factor``.

    ``z`` is the posterior mean (diffusers' ``retrieve_latents(..., sample_mode="argmax")``) or, with ``key``, a sample
    ``mean + std * normal(key)``.
    """
    mean, logvar = encode(config, params, image)
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor
