"""The models shipped inside the package: the demo text-to-image model and the ShapeEval classifier.

Both are trained by scripts in ``examples/`` (``train_demo_model.py --install``, ``train_shapeeval.py --install``)
and committed under ``pqjax/demo/assets/``, so ``pqjax demo`` and ``pqjax eval --shapeeval`` work offline right
after ``pip install``.

* ``assets/demo_model/``: the layout :func:`pqjax.demo.model.load` reads: ``transformer/`` (diffusers
  ``FluxTransformer2DModel`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``), ``text_encoder/``,
  ``tokenizer/vocab.json``, ``demo_config.json``.
* ``assets/shapeeval.npz``: the classifier's params (:func:`pqjax.demo.classifier.load`).
"""
from __future__ import annotations

import os
import pathlib

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo_model"
SHAPEEVAL = ASSETS / "shapeeval.npz"


def _missing(path: pathlib.Path, what: str, script: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: the shipped {what} is missing (a broken install?). Recreate it with "
                             f"`python examples/{script} --install` from the source tree.")


def load_demo_model(path: str | os.PathLike | None = None):
    """The demo model as a :class:`pqjax.demo.model.DemoModel` (default: the shipped one)."""
    from pqjax.demo import model

    folder = pathlib.Path(path) if path is not None else DEMO_MODEL
    if not (folder / "demo_config.json").is_file():
        if path is None:
            raise _missing(folder, "demo model", "train_demo_model.py")
        raise FileNotFoundError(f"{folder}: not a demo model folder (no demo_config.json; expected the layout of "
                                "pqjax.demo.model.load)")
    return model.load(folder)


def load_shapeeval(path: str | os.PathLike | None = None) -> dict:
    """The ShapeEval classifier's params (default: the shipped ones)."""
    from pqjax.demo import classifier

    p = pathlib.Path(path) if path is not None else SHAPEEVAL
    if not p.is_file():
        if path is None:
            raise _missing(p, "ShapeEval classifier", "train_shapeeval.py")
        raise FileNotFoundError(f"{p}: no such ShapeEval classifier file (an .npz that pqjax.demo.classifier.load "
                                "reads)")
    return classifier.load(p)
