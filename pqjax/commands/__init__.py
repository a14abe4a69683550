"""Subcommands of the `pqjax` CLI: one module each, with add_parser(subparsers) and run(args)."""
