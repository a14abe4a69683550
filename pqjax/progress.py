"""Progress of long library calls: tqdm bars on a terminal (none on a pipe or a log file, which get one summary
line through ``logging`` instead), and the step reporter that the jitted loops call from inside ``jax.jit``.

A jitted loop cannot take a fresh Python object per call without recompiling, so it always calls the module-level
:func:`report_step` (through ``jax.debug.callback``), which forwards to the innermost :func:`steps` context. A caller
can open that context itself to label the bar (``pqjax sample`` names the images of the batch); the sampler and
calibration open one when none is open.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Iterable, Iterator

from tqdm import tqdm

__all__ = ["progress_bar", "StepProgress", "steps", "active", "report_step"]


def _bar(enabled: bool, **kw) -> tqdm:
    # disable=None: tqdm turns itself off when stderr is not a terminal, so logs get no carriage returns
    return tqdm(file=sys.stderr, dynamic_ncols=True, leave=False, disable=None if enabled else True, **kw)


def progress_bar(iterable: Iterable, *, desc: str, unit: str, enabled: bool = True, total: int | None = None):
    """``iterable`` wrapped in a tqdm bar (on a terminal, when ``enabled``)."""
    return _bar(enabled, iterable=iterable, desc=desc, unit=unit, total=total)


class StepProgress:
    """Receives ``(step, num_steps)`` from a jitted loop. The bar starts once step 1 is done, so its s/step is the
    steady state; the wait for step 1, which includes compiling the loop, is shown (and summarized) apart."""

    def __init__(self, desc: str, *, enabled: bool = True):
        self.desc, self.enabled = desc, enabled
        self.num_steps = 0
        self.first_s: float | None = None      # start -> step 1 done (compile + first step)
        self.steady_s: float | None = None     # seconds per step after the first
        self._t0 = time.perf_counter()
        self._t1 = None
        self._bar = None
        self._lock = threading.Lock()

    def __call__(self, step: int, num_steps: int) -> None:
        with self._lock:
            now = time.perf_counter()
            self.num_steps = num_steps
            if self._t1 is None or step == 1:
                self.first_s, self._t1 = now - self._t0, now
                self._bar = _bar(self.enabled, total=num_steps, initial=step, desc=self.desc, unit="step",
                                 postfix=f"step 1 {self.first_s:.2f}s incl. compile")
            else:
                self._bar.update(1)
                self.steady_s = (now - self._t1) / (step - 1)
            if step == num_steps:
                self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self) -> str:
        """One line for the log: steps, the first step (with compilation), the steady-state time per step."""
        if self.first_s is None:
            return f"{self.desc}: no steps"
        s = f"{self.desc}: {self.num_steps} steps, step 1 {self.first_s:.2f} s (incl. compile)"
        if self.steady_s is not None:
            s += f", then {self.steady_s:.3f} s/step"
        return s


_SINKS: list[StepProgress] = []
_SINKS_LOCK = threading.Lock()


@contextlib.contextmanager
def steps(desc: str, *, enabled: bool = True, log: logging.Logger | None = None) -> Iterator[StepProgress]:
    """Route :func:`report_step` calls to a new :class:`StepProgress` while the block runs (block on the loop's
    result inside it); on exit its summary goes to ``log`` at INFO level."""
    p = StepProgress(desc, enabled=enabled)
    with _SINKS_LOCK:
        _SINKS.append(p)
    try:
        yield p
    finally:
        with _SINKS_LOCK:
            _SINKS.remove(p)
        p.close()
        if log is not None:
            log.info(p.summary())


def active() -> StepProgress | None:
    """The innermost open :func:`steps` context, if any."""
    with _SINKS_LOCK:
        return _SINKS[-1] if _SINKS else None


def report_step(step, num_steps, *_anchors) -> None:
    """What a jitted loop calls after each step (``jax.debug.callback``); extra arguments order it after the
    step's compute and are ignored."""
    sink = active()
    if sink is not None:
        sink(int(step), int(num_steps))
