"""Procedural shapes data + word tokenizer: determinism, independent pixel checks, caption parsing, vocab coverage."""
import collections
import re

import numpy as np
import pytest

from pqjax.demo import (COLORS, MAX_CAPTION_WORDS, PAD, SHAPES, UNK, Obj, Scene, Tokenizer, attributes, caption,
                          make_dataset, render)
from pqjax.demo.data import BACKGROUND

BG = np.array(BACKGROUND, np.uint8)


def _filled(img):
    return np.any(img != BG, axis=-1)


def _in_region(position, cx, cy, size):
    """The named position as an image region, written independently of the library's placement constants."""
    lo, hi, mid = 0.4 * size, 0.6 * size, lambda v: 0.4 * size < v < 0.6 * size
    return {"left": cx < lo and mid(cy), "right": cx > hi and mid(cy), "top": cy < lo and mid(cx),
            "bottom": cy > hi and mid(cx), "center": mid(cx) and mid(cy)}[position]


# --- determinism -------------------------------------------------------------------------------------------------

def test_dataset_is_deterministic_per_seed():
    a_img, a_cap, a_sc = make_dataset(40, seed=7)
    b_img, b_cap, b_sc = make_dataset(40, seed=7)
    c_img, c_cap, _ = make_dataset(40, seed=8)
    assert a_img.shape == (40, 32, 32, 3) and a_img.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    assert a_cap == b_cap and a_sc == b_sc
    assert a_cap != c_cap and not np.array_equal(a_img, c_img)
    img64, cap64, _ = make_dataset(40, seed=7, size=64)
    assert img64.shape == (40, 64, 64, 3) and cap64 == a_cap  # size changes pixels only, not the scenes


# --- rendering, checked from pixels ------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["left", "right", "top", "bottom", "center"])
def test_red_circle_is_red_and_in_its_region(position):
    size = 64
    img = render(Scene((Obj("circle", "red", "medium", position),)), size)
    mask = _filled(img)
    assert mask.sum() > 0
    assert np.all(img[mask] == np.array(COLORS["red"], np.uint8))  # every filled pixel is exactly red
    ys, xs = np.nonzero(mask)
    assert _in_region(position, xs.mean() + 0.5, ys.mean() + 0.5, size)


@pytest.mark.parametrize("obj_size", ["small", "medium", "large"])
def test_shape_areas_match_their_bounding_boxes(obj_size):
    size = 64
    for shape, ratio, tol in [("square", 1.0, 0.0), ("triangle", 0.5, 0.15), ("circle", np.pi / 4, 0.12)]:
        mask = _filled(render(Scene((Obj(shape, "blue", obj_size, "center"),)), size))
        ys, xs = np.nonzero(mask)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert abs(w - h) <= 1, shape
        assert abs(mask.sum() / (w * h) - ratio) <= tol * ratio + 1e-9, (shape, mask.sum(), w, h)
        if shape == "triangle":  # apex up: the top half holds much less than the bottom half
            top, bot = mask[: ys.min() + h // 2].sum(), mask[ys.min() + h // 2:].sum()
            assert top < 0.6 * bot


def test_sizes_are_ordered():
    areas = [_filled(render(Scene((Obj("square", "green", s, "center"),)), 32)).sum() for s in ("small", "medium",
                                                                                                  "large")]
    assert areas[0] < areas[1] < areas[2]


def test_two_object_scenes_do_not_overlap_and_only_use_scene_colors():
    images, _, scenes = make_dataset(200, seed=1)
    n_pairs = 0
    for img, scene in zip(images, scenes):
        colors = {tuple(c) for c in img.reshape(-1, 3)}
        assert colors <= {BACKGROUND} | {COLORS[o.color] for o in scene.objects}
        if scene.count == 2:
            n_pairs += 1
            m0, m1 = (_filled(render(Scene((o,)), 32)) for o in scene.objects)
            assert m0.sum() and m1.sum() and not np.any(m0 & m1)
            np.testing.assert_array_equal(_filled(img), m0 | m1)
            for o, m in zip(scene.objects, (m0, m1)):  # each object keeps its own colour and sits in its region
                assert np.all(img[m] == np.array(COLORS[o.color], np.uint8))
                ys, xs = np.nonzero(m)
                assert _in_region(o.position, xs.mean() + 0.5, ys.mean() + 0.5, 32)
    assert n_pairs > 50


# --- captions parse back to the scene ---------------------------------------------------------------------------

_OBJ = re.compile(r"^(a|an) (?:(small|large) )?([a-z]+) (circle|square|triangle)"
                  r"(?: (?:on the (left|right)|at the (top|bottom)))?$")
_TWO = re.compile(r"^two (?:(small|large) )?([a-z]+) (circle|square|triangle)s$")


def _parse(text):
    m = _TWO.match(text)
    if m:
        size, color, shape = m.group(1) or "medium", m.group(2), m.group(3)
        return {"count": 2, "objects": [dict(shape=shape, color=color, size=size, position=p) for p in ("left",
                                                                                                          "right")]}
    objects = []
    for part in text.split(" and "):
        m = _OBJ.match(part)
        assert m, f"unparseable: {part!r}"
        article, size, color, shape, lr, tb = m.groups()
        assert article == ("an" if (size or color)[0] in "aeiou" else "a"), part
        objects.append(dict(shape=shape, color=color, size=size or "medium", position=lr or tb or "center"))
    return {"count": len(objects), "objects": objects}


def test_captions_parse_back_to_attributes():
    _, captions, scenes = make_dataset(300, seed=2)
    for text, scene in zip(captions, scenes):
        assert _parse(text) == attributes(scene), text
    assert "a red circle on the left" == caption(Scene((Obj("circle", "red", "medium", "left"),)))
    assert "a large blue square" == caption(Scene((Obj("square", "blue", "large", "center"),)))
    assert "an orange triangle at the top and a small blue square at the bottom" == caption(Scene((
        Obj("triangle", "orange", "medium", "top"), Obj("square", "blue", "small", "bottom"))))
    assert "a large orange circle" == caption(Scene((Obj("circle", "orange", "large", "center"),)))
    g = Obj("triangle", "green", "medium", "left")
    assert "two green triangles" == caption(Scene((g, Obj("triangle", "green", "medium", "right")), identical=True))


def test_attribute_balance():
    _, captions, scenes = make_dataset(600, seed=3)
    objs = [o for s in scenes for o in s.objects]
    for field, values in [("color", list(COLORS)), ("shape", SHAPES), ("size", ["small", "medium", "large"]),
                          ("position", ["left", "right", "top", "bottom", "center"])]:
        counts = collections.Counter(getattr(o, field) for o in objs)
        assert set(counts) == set(values), field
        if field in ("color", "shape"):  # uniform draws: every value near its fair share
            fair = len(objs) / len(values)
            assert all(0.6 * fair < counts[v] < 1.4 * fair for v in values), (field, counts)
    kinds = collections.Counter((s.count, s.identical) for s in scenes)
    assert set(kinds) == {(1, False), (2, False), (2, True)} and min(kinds.values()) > 60
    assert max(len(c.split()) for c in captions) <= MAX_CAPTION_WORDS


# --- tokenizer ----------------------------------------------------------------------------------------------------

def test_vocab_layout_and_coverage():
    tok = Tokenizer()
    assert tok.vocab["<pad>"] == PAD == 0 and tok.vocab["<unk>"] == UNK == 1
    words = [w for w, _ in sorted(tok.vocab.items(), key=lambda kv: kv[1])][2:]
    assert words == sorted(words) and list(tok.vocab.values()) == list(range(len(tok)))
    _, captions, _ = make_dataset(300, seed=4)
    used = {w for c in captions for w in c.split()}
    assert used <= set(tok.vocab)
    assert used == set(tok.vocab) - {"<pad>", "<unk>"}  # the vocabulary is closed and exactly the grammar's


def test_encode_decode_roundtrip_unk_truncation_and_save_load(tmp_path):
    tok = Tokenizer()
    _, captions, _ = make_dataset(100, seed=5)
    ids, mask = tok.encode(captions, MAX_CAPTION_WORDS + 1)
    assert ids.dtype == np.int32 and ids.shape == (100, MAX_CAPTION_WORDS + 1) and mask.dtype == bool
    np.testing.assert_array_equal(mask.sum(1), [len(c.split()) for c in captions])
    assert np.all(ids[mask] > UNK) and np.all(ids[~mask] == PAD)
    assert tok.decode(ids) == captions

    ids, mask = tok.encode(["a Red zebra, on the left!"], 8)  # case-folded, punctuation dropped, unknown -> unk
    assert ids[0, :6].tolist() == [tok.vocab[w] for w in ("a", "red")] + [UNK] + [tok.vocab[w] for w in
                                                                                   ("on", "the", "left")]
    assert tok.decode(ids) == ["a red <unk> on the left"] and mask[0].tolist() == [True] * 6 + [False] * 2
    ids, mask = tok.encode("a large blue square on the left", 3)  # truncated to the first max_len words
    assert tok.decode(ids) == ["a large blue"] and mask.all()

    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab == tok.vocab
    np.testing.assert_array_equal(loaded.encode(captions, 16)[0], tok.encode(captions, 16)[0])
