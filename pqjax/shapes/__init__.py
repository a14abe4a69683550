"""The shipped demo text-to-image model and everything around it (no downloads).

``data``: seeded scenes of one or two coloured shapes, rendered with numpy and captioned from a small grammar.
``tokenizer``: those captions -> fixed-length int32 ids. ``text_encoder`` + ``train_dit``: the small FLUX transformer
and its text encoder, trained jointly with rectified flow (``examples/train_demo_model.py``). ``classifier``: the
ShapeEval reader (``examples/train_shapeeval.py``). ``shapeeval``: GenEval-style tasks and scoring. ``benchmark``:
quantize the demo model and score each method. ``assets``: the shipped model and classifier.
"""
from pqjax.shapes.data import (COLORS, MAX_CAPTION_WORDS, POSITIONS, SHAPES, SIZES, Obj, Scene, attributes, caption,
                               make_dataset, render, sample_scene, vocab_words)
from pqjax.shapes.tokenizer import PAD, UNK, Tokenizer

__all__ = ["COLORS", "MAX_CAPTION_WORDS", "POSITIONS", "SHAPES", "SIZES", "Obj", "Scene", "attributes", "caption",
           "make_dataset", "render", "sample_scene", "vocab_words", "Tokenizer", "PAD", "UNK"]
