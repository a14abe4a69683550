"""Helpers shared by the command-line and demo-model tests."""
from __future__ import annotations

import os

from pqjax.cli import main


def run_main(capsys, *argv):
    """``pqjax.cli.main(argv)`` -> (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def fresh_seed() -> int:
    """A new random seed each run, printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"fresh seed {seed}")
    return seed
