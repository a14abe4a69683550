"""Quantize the demo model and measure what each method does to it: ShapeEval accuracy and error vs float.

Used by ``pqjax eval --shapeeval``, ``pqjax demo`` and ``examples/results.py`` (which writes ``docs/RESULTS.md``).

    model, cls = assets.load_demo_model(), assets.load_shapeeval()
    items = shapeeval.prompts(50)
    ref = run_variant(model, cls, items)                                  # float
    q, report = quantize_demo(model, "nvfp4", "permuquant")
    row = run_variant(model, cls, items, transformer=q, reference=ref)    # + latent error / PSNR vs float
"""
from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from pqjax import evaluate
from pqjax.config import METHODS
from pqjax.demo import model as dm
from pqjax.demo import shapeeval
from pqjax.demo.data import make_dataset
from pqjax.formats import FORMATS

CALIB_SEED = 77_001           # calibration prompts and noise (disjoint from ShapeEval's and training's seeds)


def parse_variants(text: str) -> list[tuple[str, str, str]]:
    """``"nvfp4:rtn,int3:permuquant"`` -> ``[(name, format, method), ...]``; ValueError naming a bad entry."""
    out = []
    for v in (v.strip() for v in text.split(",")):
        if not v:
            continue
        fmt, _, method = v.partition(":")
        if fmt not in FORMATS or method not in METHODS:
            raise ValueError(f"bad variant {v!r}: expected format:method with format in {FORMATS} and method "
                             f"in {METHODS}")
        out.append((v, fmt, method))
    return out


def calib_batch(model: dm.DemoModel, n: int = 32, steps: int = 20, seed: int = CALIB_SEED):
    """A :class:`pqjax.CalibBatch` for the demo model: ``n`` training-distribution captions (seed ``seed``), their
    text embeddings, seeded noise and the demo sampler's schedule (static shift 1, 2 pixels per latent)."""
    from pqjax.calib import CalibBatch

    _, captions, _ = make_dataset(n, seed=seed)
    hidden, pooled = dm.encode_captions(model, captions)
    return CalibBatch(encoder_hidden_states=hidden, pooled_projections=pooled, height=dm.IMAGE_SIZE,
                      width=dm.IMAGE_SIZE, num_inference_steps=steps, latents=dm.initial_noise(seed, n),
                      seed=seed, scheduler_config=dm.SCHEDULER, vae_scale_factor=dm.PATCH)


def quantize_demo(model: dm.DemoModel, fmt: str, method: str, *, calib=None, progress: bool = False, **kw):
    """``pqjax.quantize`` the demo transformer (default rules) -> ``(qparams, report)``."""
    import pqjax

    calib = calib if calib is not None else calib_batch(model)
    cfg = pqjax.QuantConfig(format=fmt, method=method, **kw)
    return pqjax.quantize(model.params["transformer"], calib, config=cfg, model_config=model.config.flux,
                          progress=progress)


@dataclasses.dataclass
class VariantResult:
    name: str
    tasks: dict
    overall: float
    latents: np.ndarray
    images: np.ndarray
    latent_rel_err: float | None = None   # vs the float model's final latents (same prompts, same noise)
    psnr: float | None = None             # dB, vs the float model's images
    seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)

    def row(self) -> dict:
        return {"name": self.name, "tasks": self.tasks, "overall": self.overall,
                "latent_rel_err": self.latent_rel_err, "psnr": self.psnr, "seconds": self.seconds, **self.extra}


def run_variant(model: dm.DemoModel, classifier_params: dict, items: list, *, transformer=None, name: str = "float",
                steps: int = 20, seed: int = 0, reference: VariantResult | None = None,
                chunk: int = 64) -> VariantResult:
    """Sample ``items``' captions with ``transformer`` (default: the float one), score them with ShapeEval and,
    given the float ``reference``, measure the final-latent relative error and image PSNR against it."""
    t0 = time.perf_counter()
    lat = dm.generate_latents(model, [it.caption for it in items], seed=seed, steps=steps, transformer=transformer,
                              chunk=chunk)
    images = dm.tokens_to_image(jnp.asarray(lat))
    res = shapeeval.score(classifier_params, images, items)
    out = VariantResult(name, res["tasks"], res["overall"], lat, images, seconds=time.perf_counter() - t0)
    if reference is not None:
        out.latent_rel_err = evaluate.relative_error(lat, reference.latents)
        out.psnr = evaluate.psnr(images, reference.images, 255.0)
    return out


def markdown_table(results: list[VariantResult]) -> str:
    """One row per variant: ShapeEval per task and overall (%), final-latent rel. error and PSNR vs float."""
    tasks = [t for t in shapeeval.TASKS if t in results[0].tasks]
    head = "| model | " + " | ".join(tasks) + " | **overall** | latent rel. err | PSNR (dB) |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for r in results:
        err = "-" if r.latent_rel_err is None else f"{r.latent_rel_err:.4f}"
        psnr = "-" if r.psnr is None else ("inf" if np.isinf(r.psnr) else f"{r.psnr:.2f}")
        cells = " | ".join(f"{100 * r.tasks[t]:.1f}" for t in tasks)
        lines.append(f"| {r.name} | {cells} | **{100 * r.overall:.1f}** | {err} | {psnr} |")
    return "\n".join(lines)


def write_grid(path, columns: list, labels: list[str], scale: int = 4, *, row_labels: list[str] | None = None,
               metadata: dict | None = None):
    """columns: list of uint8 ``[B, H, W, 3]`` arrays -> one PNG; rows = prompts, columns = models. ``labels`` name
    the columns (on top); ``row_labels`` (the captions) are written in a strip above each row; ``metadata``
    becomes PNG text chunks. Written atomically."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    from pqjax.io.atomic import atomic_write

    columns = [np.asarray(c).repeat(scale, axis=1).repeat(scale, axis=2) for c in columns]
    b, h, w, _ = columns[0].shape
    pad, top = 4, 14
    strip = 12 if row_labels is not None else 0
    if row_labels is not None and len(row_labels) != b:
        raise ValueError(f"write_grid: {len(row_labels)} row labels for {b} rows")
    grid = np.full((top + b * (strip + h + pad), len(columns) * (w + pad), 3), 255, np.uint8)
    for j, col in enumerate(columns):
        for i in range(b):
            y, x = top + i * (strip + h + pad) + strip, j * (w + pad)
            grid[y:y + h, x:x + w] = col[i]
    im = Image.fromarray(grid)
    draw = ImageDraw.Draw(im)
    for j, label in enumerate(labels):
        draw.text((j * (w + pad) + 2, 1), label[: max(4, w // 6)], fill=(0, 0, 0))
    for i, caption in enumerate(row_labels or ()):
        draw.text((2, top + i * (strip + h + pad)), caption[: grid.shape[1] // 6], fill=(60, 60, 60))
    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    with atomic_write(path, overwrite=True) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)
