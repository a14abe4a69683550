"""Write a file or a directory all at once: into ``PATH.partial-<random>`` next to it, fsynced, then renamed.

    with atomic_write("model.safetensors") as tmp:        # a file
        write_everything_to(tmp)
    with atomic_write("ckpt", directory=True) as tmp:     # a directory (created empty)
        ...

An exception inside the block removes the temporary path; a process killed inside it leaves a stale
``PATH.partial-*`` (safe to delete; :func:`partials` finds them). Either way ``PATH`` is the old one or the new one,
never half of each: a file is replaced by ``os.replace``; a directory that exists is first renamed to
``PATH.old-<random>`` (so with ``overwrite=True`` there is a moment when ``PATH`` is absent), then removed.
Single-process only.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator

__all__ = ["atomic_write", "partials", "fsync_dir"]


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries); a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_write(path, *, directory: bool = False, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary path to write ``path`` into; commit it by a rename when the block succeeds.

    ``directory``: the temporary path is an empty directory (else nothing exists there yet: create the file).
    ``overwrite``: replace an existing ``path`` (else :class:`FileExistsError`, before anything is written)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.partial-{uuid.uuid4().hex[:12]}"
    if directory:
        os.makedirs(tmp)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"atomic_write: nothing was written to {tmp}")
        if directory:
            fsync_dir(tmp)
            old = None
            if os.path.lexists(path):
                old = f"{path}.old-{uuid.uuid4().hex[:12]}"
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        else:
            _fsync_file(tmp)
            os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def partials(path) -> list[str]:
    """Leftovers of interrupted :func:`atomic_write` calls for ``path`` (sorted)."""
    parent, base = os.path.split(os.path.abspath(os.fspath(path)))
    try:
        return sorted(os.path.join(parent, n) for n in os.listdir(parent or ".") if n.startswith(base + ".partial-"))
    except OSError:
        return []
