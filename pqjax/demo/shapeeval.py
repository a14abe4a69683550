"""ShapeEval: a GenEval-style check of a text-to-image model on the shapes grammar.

Like GenEval, the score is object-focused: held-out prompts per *task*, each image read back by a detector (here the
ShapeEval classifier, :mod:`pqjax.demo.classifier`), and a task-specific rule saying whether the image shows what
the prompt asked for. Overall accuracy is the mean over tasks.

=============  ======================================================  ==========================================
task           prompt                                                  correct when the classifier reads
=============  ======================================================  ==========================================
single_object  one object, centred ("a large red circle")              one object of that shape
two_objects    two different shapes at opposite positions              two objects, the same two shapes
counting       "two green triangles" or "a green triangle" (half each) the right count
colors         one object, centred ("a purple square")                 one object of that colour
position       one object off-centre ("a red circle on the left")      one object at that position
color_attr     two objects, different shapes and colours               two objects, each shape with its colour
=============  ======================================================  ==========================================

Sizes are drawn at random but not scored (GenEval has no size task); the classifier reads them anyway.

    items = prompts(50)                                 # 50 per task, from the held-out seed
    images = generate([it.caption for it in items])     # any text-to-image function, uint8 [N, 32, 32, 3]
    result = score(classifier_params, images, items)    # {"tasks": {...}, "overall": 0.97, "correct": [...]}
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from pqjax.demo import classifier as C
from pqjax.demo.data import COLORS, PAIRS, POSITIONS, SHAPES, SIZES, Obj, Scene, caption

TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
HELDOUT_SEED = 20_260_509  # prompt seed of every reported ShapeEval number (training uses other seeds)


@dataclasses.dataclass(frozen=True)
class Prompt:
    task: str
    scene: Scene       # what the prompt asks for (its caption is exact: the grammar is lossless)
    caption: str


def _pick(rng, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _task_scene(task: str, rng: np.random.Generator, i: int) -> Scene:
    size = _pick(rng, SIZES)
    if task in ("single_object", "colors"):
        return Scene((Obj(_pick(rng, SHAPES), _pick(rng, COLORS), size, "center"),))
    if task == "position":
        return Scene((Obj(_pick(rng, SHAPES), _pick(rng, COLORS), size, _pick(rng, [p for p in POSITIONS
                                                                                   if p != "center"])),))
    if task == "counting":
        shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
        if i % 2:
            return Scene((Obj(shape, color, size, "left"), Obj(shape, color, size, "right")), identical=True)
        return Scene((Obj(shape, color, size, _pick(rng, POSITIONS)),))
    if task in ("two_objects", "color_attr"):
        s1, s2 = rng.choice(len(SHAPES), 2, replace=False)
        colors = list(COLORS)
        if task == "color_attr":
            c1, c2 = (colors[j] for j in rng.choice(len(colors), 2, replace=False))
        else:
            c1, c2 = _pick(rng, colors), _pick(rng, colors)
        p, q = _pick(rng, PAIRS)
        return Scene((Obj(SHAPES[s1], c1, size, p), Obj(SHAPES[s2], c2, _pick(rng, SIZES), q)))
    raise ValueError(f"unknown ShapeEval task {task!r}; expected one of {TASKS}")


def prompts(n_per_task: int, seed: int = HELDOUT_SEED, tasks=TASKS) -> list[Prompt]:
    """``n_per_task`` prompts for each task (task-major order), deterministic in ``seed``."""
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    out = []
    for t, task in enumerate(tasks):
        if task not in TASKS:
            raise ValueError(f"unknown ShapeEval task {task!r}; expected one of {TASKS}")
        rng = np.random.default_rng([int(seed), t])
        for i in range(int(n_per_task)):
            scene = _task_scene(task, rng, i)
            out.append(Prompt(task, scene, caption(scene)))
    return out


def is_correct(task: str, pred: dict, scene: Scene) -> bool:
    """Whether predicted attributes ``pred`` (``{"count", "objects"}``, as from ``classifier.predict_attributes``)
    satisfy ``task`` for the asked-for ``scene``."""
    want = [dataclasses.asdict(o) for o in scene.objects]
    got = pred["objects"]
    if task == "counting":
        return pred["count"] == scene.count
    if pred["count"] != scene.count:
        return False
    if task == "single_object":
        return got[0]["shape"] == want[0]["shape"]
    if task == "colors":
        return got[0]["color"] == want[0]["color"]
    if task == "position":
        return got[0]["position"] == want[0]["position"]
    if task == "two_objects":
        return Counter(o["shape"] for o in got) == Counter(o["shape"] for o in want)
    if task == "color_attr":
        return Counter((o["shape"], o["color"]) for o in got) == Counter((o["shape"], o["color"]) for o in want)
    raise ValueError(f"unknown ShapeEval task {task!r}; expected one of {TASKS}")


def score(classifier_params: dict, images, items: list[Prompt]) -> dict:
    """``{"tasks": {task: accuracy}, "overall": mean over tasks, "correct": [bool per item], "n_per_task": {...}}``."""
    images = np.asarray(images)
    if len(images) != len(items):
        raise ValueError(f"score: {len(images)} images for {len(items)} prompts")
    preds = C.predict_attributes(classifier_params, images)
    correct = [is_correct(it.task, p, it.scene) for it, p in zip(items, preds)]
    tasks = [t for t in TASKS if any(it.task == t for it in items)]
    acc = {t: float(np.mean([c for c, it in zip(correct, items) if it.task == t])) for t in tasks}
    return {"tasks": acc, "overall": float(np.mean(list(acc.values()))), "correct": correct,
            "n_per_task": {t: sum(it.task == t for it in items) for t in tasks}}


def generator_score(classifier_params: dict, items: list[Prompt]) -> dict:
    """:func:`score` on the generator's own renders of the prompts: the classifier's ceiling (should be ~1.0)."""
    from pqjax.demo.data import render
    return score(classifier_params, np.stack([render(it.scene) for it in items]), items)
