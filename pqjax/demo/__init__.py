"""The shipped demo text-to-image model and everything around it (no downloads; inference only).

``data``: seeded scenes of one or two coloured shapes, rendered with numpy and captioned from a small grammar.
``tokenizer``: those captions -> fixed-length int32 ids. ``model`` + ``text_encoder``: the small FLUX transformer
(pixel space) and its text encoder. ``classifier``: the ShapeEval reader. ``shapeeval``: GenEval-style tasks and
scoring. ``benchmark``: quantize the demo model and score each method. ``assets``: the shipped model and classifier.
Their training code is ``examples/demo_training.py`` (``examples/train_demo_model.py``, ``train_shapeeval.py``).
"""
from pqjax.demo.data import (COLORS, MAX_CAPTION_WORDS, POSITIONS, SHAPES, SIZES, Obj, Scene, attributes, caption,
                             make_dataset, render, sample_scene, vocab_words)
from pqjax.demo.tokenizer import PAD, UNK, Tokenizer

__all__ = ["COLORS", "MAX_CAPTION_WORDS", "POSITIONS", "SHAPES", "SIZES", "Obj", "Scene", "attributes", "caption",
           "make_dataset", "render", "sample_scene", "vocab_words", "Tokenizer", "PAD", "UNK"]
