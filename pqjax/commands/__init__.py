"""Subcommands of the ``pqjax`` CLI: one module each, with ``add_parser(subparsers)`` and ``run(args)``; their
shared flags are :mod:`.options`, their shared inputs and outputs :mod:`.common`."""


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""
