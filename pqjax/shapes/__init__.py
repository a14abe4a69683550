"""Procedural "shapes" text-to-image data (no downloads) and its closed-vocabulary word tokenizer.

``data`` samples scenes of one or two coloured shapes, renders them with numpy and captions them from a small
grammar; ``tokenizer`` maps those captions to fixed-length int32 ids.
"""
from pqjax.shapes.data import (COLORS, MAX_CAPTION_WORDS, POSITIONS, SHAPES, SIZES, Obj, Scene, attributes, caption,
                               make_dataset, render, sample_scene, vocab_words)
from pqjax.shapes.tokenizer import PAD, UNK, Tokenizer

__all__ = ["COLORS", "MAX_CAPTION_WORDS", "POSITIONS", "SHAPES", "SIZES", "Obj", "Scene", "attributes", "caption",
           "make_dataset", "render", "sample_scene", "vocab_words", "Tokenizer", "PAD", "UNK"]
