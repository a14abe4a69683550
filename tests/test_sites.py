"""Absorption is exact: random (not searched) permutations at every FLUX site leave the float model unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import sites as S
from pqjax.models import flux
from pqjax.models.flux import FluxConfig

from tolerances import flux_depth, flux_k, fp32_bound


def _inputs(c, B=2, n_img=16, n_txt=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.zeros(n_img), np.arange(n_img) // 4, np.arange(n_img) % 4], -1).astype(np.float32)
    return dict(hidden_states=jnp.asarray(rng.standard_normal((B, n_img, c.in_channels)), jnp.float32),
                encoder_hidden_states=jnp.asarray(rng.standard_normal((B, n_txt, c.joint_attention_dim)), jnp.float32),
                pooled_projections=jnp.asarray(rng.standard_normal((B, c.pooled_projection_dim)), jnp.float32),
                timestep=jnp.asarray(rng.uniform(0, 1, B), jnp.float32), img_ids=jnp.asarray(ids),
                txt_ids=jnp.zeros((n_txt, 3)), guidance=jnp.full((B,), 3.5))


def test_site_table_covers_every_quantizable_linear():
    c = FluxConfig.tiny()
    table = S.flux_sites(c)
    params = flux.param_layout(c)
    linears = set(S.linear_paths(params))
    consumers = {p for s in table for p in s.consumers}
    # every linear that reads a permutable activation is a consumer; embedders and the output proj read model inputs
    assert linears - consumers == {"x_embedder", "context_embedder", "proj_out",
                                   *[p for p in linears if p.startswith("time_text_embed.")]}
    per_double = {s.name.split(".")[-1] for s in table if s.name.startswith("transformer_blocks.0.")}
    assert per_double == {"P1_img", "P1_txt", "P2", "P3_img", "P3_txt", "P4_img", "P4_txt"}
    for s in table:
        for path in s.consumers:
            assert S.get_path(params, path)["kernel"][0] == s.k, (s.name, path)


@pytest.mark.parametrize("guidance", [True, False])
def test_random_permutations_everywhere_are_exact(guidance):
    c = FluxConfig.tiny(guidance_embeds=guidance)
    params = flux.init_params(c, jax.random.key(1), std=0.05)
    # non-trivial norm scales and biases so a missed bias/row permutation shows
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
    kw = _inputs(c)
    if not guidance:
        kw["guidance"] = None
    f = jax.jit(lambda p, kw: flux.forward(c, p, **kw))
    ref = np.asarray(f(params, kw))
    rng = np.random.default_rng(0)
    permuted = params
    for site in S.flux_sites(c):
        perm = S.random_permutation(site, rng)
        assert not np.array_equal(perm, np.arange(site.k))
        permuted = S.absorb(permuted, site, perm)
    out = np.asarray(f(permuted, kw))
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    # a permutation only reorders every reduction: fp32 rounding order
    assert rel <= fp32_bound(flux_k(c.inner_dim, 16 + 7), flux_depth(c.num_layers, c.num_single_layers)), rel
    # and a wrong absorption is caught: permuting only the consumers of one site changes the output
    site = S.flux_sites(c)[0]
    perm = S.random_permutation(site, rng)
    broken = params
    for path in site.consumers:
        lin = S.get_path(broken, path)
        broken = S.set_path(broken, path, {**lin, "kernel": lin["kernel"][perm]})
    assert np.abs(np.asarray(f(broken, kw)) - ref).max() / np.abs(ref).max() > 1e-3


def test_absorb_rejects_bad_permutations():
    c = FluxConfig.tiny()
    params = flux.init_params(c, jax.random.key(0))
    p2 = next(s for s in S.flux_sites(c) if s.name.endswith("P2"))
    with pytest.raises(ValueError, match="crosses its block"):
        S.absorb(params, p2, np.roll(np.arange(p2.k), 1))
    with pytest.raises(ValueError, match="expected a permutation of"):
        S.absorb(params, p2, np.zeros(p2.k, int))
