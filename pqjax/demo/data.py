"""Seeded procedural scenes of simple coloured shapes, rendered with numpy and captioned from a tiny grammar.

Scene kinds (sampled with probabilities 0.5 / 0.3 / 0.2):

* one object:             ``"a red circle on the left"``, ``"a large blue square"``
* two different objects:  ``"a red circle on the left and a small blue square on the right"``
* two identical objects:  ``"two green triangles"``

Captions are a lossless function of the scene under two conventions: the ``"medium"`` size is never said
(``"a red circle"`` is medium, ``"a large red circle"`` is large) and the ``"center"`` position is never said.
Two-object scenes always sit at opposite positions (left/right or top/bottom, in caption order), so their shapes never
overlap; identical pairs ("two ...") always sit left then right.  Articles follow English: ``"an orange square"``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {  # fixed RGB values, far apart from each other and from the background
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 180), "orange": (245, 140, 20), "pink": (245, 130, 190), "cyan": (30, 200, 210)}
BACKGROUND = (255, 255, 255)
SIZES = {"small": 0.10, "medium": 0.15, "large": 0.20}  # half-extent (circle radius, half side) as image fraction
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}  # object centre (x, y) as image fraction; y grows downwards
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": ""}
UNSAID_SIZE, UNSAID_POSITION = "medium", "center"
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    identical: bool = False  # a two-object scene of one shape/colour/size, captioned "two <color> <shape>s"

    @property
    def count(self) -> int:
        return len(self.objects)


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene from ``rng`` (a ``np.random.Generator``)."""
    kind = rng.choice(3, p=[0.5, 0.3, 0.2])
    if kind == 0:
        return Scene((Obj(_pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES), _pick(rng, POSITIONS)),))
    if kind == 1:
        a = (_pick(rng, SHAPES), _pick(rng, COLORS))
        b = a
        while b == a:  # distinct (shape, colour) so the "and" caption never describes an identical pair
            b = (_pick(rng, SHAPES), _pick(rng, COLORS))
        p, q = _pick(rng, PAIRS)
        return Scene((Obj(*a, _pick(rng, SIZES), p), Obj(*b, _pick(rng, SIZES), q)))
    shape, color, size = _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES)
    return Scene((Obj(shape, color, size, "left"), Obj(shape, color, size, "right")), identical=True)


def _mask(obj: Obj, size: int) -> np.ndarray:
    """Boolean [size, size] coverage of one object, sampled at pixel centres."""
    fx, fy = POSITIONS[obj.position]
    cx, cy, r = fx * size, fy * size, SIZES[obj.size] * size
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":  # side 2r
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "triangle":  # apex up at (cx, cy - r), base 2r wide along y = cy + r: half its 2r x 2r box
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render ``scene`` to a uint8 [size, size, 3] image (no anti-aliasing) on the plain ``BACKGROUND``."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        img[_mask(obj, size)] = COLORS[obj.color]
    return img


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: Obj) -> str:
    words = ([] if obj.size == UNSAID_SIZE else [obj.size]) + [obj.color, obj.shape]
    pos = POSITION_PHRASES[obj.position]
    return " ".join([_article(words[0])] + words + ([pos] if pos else []))


def caption(scene: Scene) -> str:
    """Caption ``scene`` from the grammar described in the module docstring."""
    if scene.identical:
        o = scene.objects[0]
        return " ".join(["two"] + ([] if o.size == UNSAID_SIZE else [o.size]) + [o.color, o.shape + "s"])
    return " and ".join(_phrase(o) for o in scene.objects)


def attributes(scene: Scene) -> dict:
    """Classifier targets: ``{"count": n, "objects": [{"shape", "color", "size", "position"}, ...]}`` in caption
    order (strings; index them with ``SHAPES`` / ``list(COLORS)`` / ``list(SIZES)`` / ``list(POSITIONS)``)."""
    return {"count": scene.count, "objects": [dataclasses.asdict(o) for o in scene.objects]}


def vocab_words() -> list[str]:
    """Every word the grammar can emit, sorted."""
    words = {"a", "an", "and", "two", *SHAPES, *(s + "s" for s in SHAPES), *COLORS, *(set(SIZES) - {UNSAID_SIZE})}
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


# longest caption: "a large <color> <shape> at the bottom and a large <color> <shape> at the top"
MAX_CAPTION_WORDS = 2 * 7 + 1


def make_dataset(n: int, seed: int = 0, size: int = 32):
    """``(images uint8 [n, size, size, 3], captions list[str], scenes list[Scene])``, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    return images, [caption(s) for s in scenes], scenes
