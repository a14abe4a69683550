"""FLUX permutation sites: which linears share an input, their constraints, and how a permutation is absorbed.

A :class:`Site` is one K-channel activation space. A permutation ``perm`` of it (new channel ``j`` = old channel
``perm[j]``) is absorbed offline so that the permuted float model computes exactly what the original did:

* ``consumers``: linears whose kernel ROWS (input channels) are reordered: ``kernel[perm, :]``.
* ``producers``: linears whose output COLUMNS (+ bias) make the activation (P2, P4, proj_out input, temb):
  ``(path, start, size)`` says site channels ``[start, start + size)`` are that linear's outputs.
* ``modulation``: for sites that live "inside the norm" (P1, P3): the adaLN linear whose shift/scale chunks are
  reordered, and ``norm``, the params path where the model reads the normalized activation through ``perm``.
* ``blocks``: the constraint: the permutation stays inside each contiguous block (P2 stays inside each head).

Site names: per double block ``P1_img P1_txt P2 P3_img P3_txt P4_img P4_txt``, per single block
``P1`` and ``OUT`` (proj_out's input = concat(attention, mlp)), plus the global modulation site ``MOD`` (SiLU(temb)).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pqjax.models.flux import FluxConfig


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    k: int
    consumers: tuple[str, ...]
    inputs: tuple[str, ...]           # per consumer: the linear whose (tapped) input it reads
    producers: tuple[tuple[str, int, int], ...] = ()
    modulation: tuple[str, int, tuple[int, ...]] | None = None   # (adaLN linear, n_chunks, chunks to permute)
    norm: str | None = None
    blocks: tuple[int, ...] | None = None

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.inputs))


def modulation_linears(config: FluxConfig) -> list[str]:
    out = []
    for i in range(config.num_layers):
        out += [f"transformer_blocks.{i}.norm1.linear", f"transformer_blocks.{i}.norm1_context.linear"]
    out += [f"single_transformer_blocks.{i}.norm.linear" for i in range(config.num_single_layers)]
    return out


def flux_sites(config: FluxConfig) -> list[Site]:
    """The FLUX site table (module docstring) for ``config``."""
    D, H, hd, mlp = config.inner_dim, config.num_attention_heads, config.attention_head_dim, config.mlp_hidden_dim
    heads = (hd,) * H
    sites: list[Site] = []
    for i in range(config.num_layers):
        b = f"transformer_blocks.{i}"
        for s, (norm1, q, k, v, ff, norm2) in {
            "img": ("norm1", "attn.to_q", "attn.to_k", "attn.to_v", "ff", "norm2"),
            "txt": ("norm1_context", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "ff_context",
                    "norm2_context"),
        }.items():
            qkv = tuple(f"{b}.{n}" for n in (q, k, v))
            sites.append(Site(f"{b}.P1_{s}", D, qkv, (qkv[0],) * 3, modulation=(f"{b}.{norm1}.linear", 6, (0, 1)),
                              norm=f"{b}.{norm1}"))
            w1, w2 = f"{b}.{ff}.net.0.proj", f"{b}.{ff}.net.2"
            sites.append(Site(f"{b}.P3_{s}", D, (w1,), (w1,), modulation=(f"{b}.{norm1}.linear", 6, (3, 4)),
                              norm=f"{b}.{norm2}"))
            sites.append(Site(f"{b}.P4_{s}", mlp, (w2,), (w2,), producers=((w1, 0, mlp),)))
        outs = (f"{b}.attn.to_out.0", f"{b}.attn.to_add_out")
        sites.append(Site(f"{b}.P2", D, outs, outs, producers=((f"{b}.attn.to_v", 0, D), (f"{b}.attn.add_v_proj", 0, D)),
                          blocks=heads))
    for i in range(config.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        cons = tuple(f"{b}.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
        sites.append(Site(f"{b}.P1", D, cons, (cons[0],) * 4, modulation=(f"{b}.norm.linear", 3, (0, 1)),
                          norm=f"{b}.norm"))
        sites.append(Site(f"{b}.OUT", D + mlp, (f"{b}.proj_out",), (f"{b}.proj_out",),
                          producers=((f"{b}.attn.to_v", 0, D), (f"{b}.proj_mlp", D, mlp)), blocks=heads + (mlp,)))
    mods = tuple(modulation_linears(config)) + ("norm_out.linear",)
    embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if config.guidance_embeds else [])
    sites.append(Site("MOD", D, mods, (mods[0],) * len(mods),
                      producers=tuple((f"time_text_embed.{e}.linear_2", 0, D) for e in embedders)))
    return sites


# ---------------------------------------------------------------------------------------------- params access

def get_path(params: dict, path: str) -> Any:
    node = params
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"params have no module {path!r} (missing {part!r})")
        node = node[part]
    return node


def set_path(params: dict, path: str, value: Any) -> dict:
    """Functional update: returns a new nested dict with ``path`` set (unchanged branches are shared)."""
    head, _, rest = path.partition(".")
    new = dict(params)
    new[head] = value if not rest else set_path(params.get(head, {}), rest, value)
    return new


def linear_paths(params: dict, prefix: str = "") -> list[str]:
    """Every module path holding a ``kernel`` (i.e. every linear), in tree order."""
    out = []
    for key, val in params.items():
        if not isinstance(val, dict):
            continue
        path = f"{prefix}{key}"
        if "kernel" in val:
            out.append(path)
        else:
            out += linear_paths(val, path + ".")
    return out


# ---------------------------------------------------------------------------------------------- absorption

def absorb(params: dict, site: Site, perm) -> dict:
    """Absorb ``perm`` (new channel j = old channel perm[j]) of ``site`` into float params. Exact in any dtype."""
    perm = np.asarray(perm, np.int64)
    if perm.shape != (site.k,) or not np.array_equal(np.sort(perm), np.arange(site.k)):
        raise ValueError(f"site {site.name}: expected a permutation of {site.k} channels, got shape {perm.shape}")
    _check_blocks(site, perm)
    for path in site.consumers:
        lin = get_path(params, path)
        params = set_path(params, path, {**lin, "kernel": lin["kernel"][perm, :]})
    for path, start, size in site.producers:
        sub = perm[start:start + size] - start
        lin = dict(get_path(params, path))
        lin["kernel"] = lin["kernel"][:, sub]
        if "bias" in lin:
            lin["bias"] = lin["bias"][sub]
        params = set_path(params, path, lin)
    if site.modulation is not None:
        path, n_chunks, chunks = site.modulation
        lin = dict(get_path(params, path))
        cols = np.arange(n_chunks * site.k)
        for c in chunks:
            cols[c * site.k:(c + 1) * site.k] = c * site.k + perm
        lin["kernel"] = lin["kernel"][:, cols]
        if "bias" in lin:
            lin["bias"] = lin["bias"][cols]
        params = set_path(params, path, lin)
    if site.norm is not None:
        try:
            norm = dict(get_path(params, site.norm))
        except KeyError:
            norm = {}
        old = np.asarray(norm["perm"]) if "perm" in norm else np.arange(site.k)
        norm["perm"] = np.asarray(old[perm], np.int32)  # read old order first, then this site's permutation
        params = set_path(params, site.norm, norm)
    return params


def _check_blocks(site: Site, perm: np.ndarray) -> None:
    if site.blocks is None:
        return
    start = 0
    for b in site.blocks:
        seg = perm[start:start + b]
        if seg.min() < start or seg.max() >= start + b:
            raise ValueError(f"site {site.name}: permutation crosses its block [{start}, {start + b}) "
                             "(P2 must stay within each head)")
        start += b


def random_permutation(site: Site, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation that respects the site's block constraint (for tests)."""
    blocks = site.blocks or (site.k,)
    out, start = [], 0
    for b in blocks:
        out.append(start + rng.permutation(b))
        start += b
    return np.concatenate(out)
