"""The CLI speaks one vocabulary: a flag means the same thing (same destination, same parsed value) in every
subcommand that has it; the old spellings still parse, hidden from --help, to the same values, with a deprecation
warning. Pure argparse: nothing is run."""
from __future__ import annotations

import argparse

import pytest

from cli_helpers import run_main
from pqjax.cli import build_parser
from pqjax.commands import options

PARSER = build_parser()
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
POSITIONALS = {"convert": ["src", "out"], "quantize": ["src", "out"], "sample": ["model", "--out", "o"],
               "eval": ["f", "q"], "bench": [], "demo": []}

# one concept, one flag: the commands that take it
CONCEPTS = {
    "--prompt": ("quantize", "sample", "eval"),
    "--prompts": ("quantize", "sample", "eval"),
    "--embeddings": ("quantize", "sample", "eval"),
    "--components": ("quantize", "sample", "eval"),
    "--max-sequence-length": ("quantize", "sample", "eval"),
    "--steps": ("quantize", "sample", "eval", "demo"),
    "--guidance": ("quantize", "sample", "eval"),
    "--height": ("quantize", "sample", "eval", "bench"),
    "--width": ("quantize", "sample", "eval", "bench"),
    "--seed": ("quantize", "sample", "eval", "demo"),
    "--dtype": ("convert", "quantize", "sample"),
    "--format": ("quantize", "bench"),
    "--method": ("quantize", "bench"),
    "--group-size": ("quantize", "bench"),
    "--rules": ("quantize", "bench"),
    "--overwrite": ("convert", "quantize", "sample", "eval", "demo"),
    "--out": ("sample", "eval", "demo"),
    "--json": ("eval", "bench"),
    "--variants": ("eval", "demo"),
    "--demo-model": ("eval", "demo"),
    "--batch-size": ("sample", "bench"),
    "--quiet": tuple(SUBPARSERS),
}
# old spelling -> (commands, argv, the canonical argv it means)
OLD = {
    "--guidance-scale": (("quantize", "sample", "eval"), ["--guidance-scale", "2.5"], ["--guidance", "2.5"]),
    "--calib-embeds": (("quantize",), ["--calib-embeds", "e.st"], ["--embeddings", "e.st"]),
    "--calib-prompts": (("quantize",), ["--calib-prompts", "p.txt"], ["--prompts", "p.txt"]),
    "--embeds": (("eval",), ["--embeds", "e.st"], ["--embeddings", "e.st"]),
    "--calib-steps": (("quantize",), ["--calib-steps", "3"], ["--steps", "3"]),
    "--calib-size": (("quantize",), ["--calib-size", "64x32"], ["--height", "64", "--width", "32"]),
    "--size": (("quantize", "sample", "eval", "bench"), ["--size", "48"], ["--height", "48", "--width", "48"]),
    "--seeds": (("eval",), ["--seeds", "3", "4"], ["--seed", "3", "4"]),
    "--formats": (("bench",), ["--formats", "int4", "int3"], ["--format", "int4", "int3"]),
    "--batch": (("bench",), ["--batch", "2"], ["--batch-size", "2"]),
    "--model": (("demo",), ["--model", "m"], ["--demo-model", "m"]),
    "bf16": (("convert", "quantize", "sample"), ["--dtype", "bf16"], ["--dtype", "bfloat16"]),
    "f32": (("convert", "quantize", "sample"), ["--dtype", "f32"], ["--dtype", "float32"]),
}


def parse(command, argv):
    if command == "sample" and not {"--prompt", "--prompts", "--embeddings"} & set(argv):
        argv = [*argv, "--prompt", "x"]  # sample requires a prompt source
    return vars(PARSER.parse_args([command, *POSITIONALS[command], *argv]))


def visible_flags(command) -> dict[str, argparse.Action]:
    return {s: a for a in SUBPARSERS[command]._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


@pytest.mark.parametrize("flag", sorted(CONCEPTS))
def test_every_command_has_the_flag_with_one_destination(flag):
    dests = {}
    for command in CONCEPTS[flag]:
        actions = visible_flags(command)
        assert flag in actions, f"pqjax {command} has no {flag}"
        dests[command] = actions[flag].dest
    assert len(set(dests.values())) == 1, dests


def test_the_same_argv_parses_to_the_same_values():
    argv = ["--guidance", "2.5", "--height", "64", "--width", "32", "--steps", "3", "--max-sequence-length", "77",
            "--components", "pipe", "--embeddings", "e.st"]
    got = {c: parse(c, argv) for c in ("quantize", "sample", "eval")}
    for key in ("guidance", "height", "width", "steps", "max_sequence_length", "components", "embeddings"):
        assert len({repr(g[key]) for g in got.values()}) == 1, (key, {c: g[key] for c, g in got.items()})
    seeds = {c: parse(c, ["--seed", "7"])["seed"] for c in ("quantize", "sample", "eval", "demo")}
    assert {c: (s if isinstance(s, list) else [s]) for c, s in seeds.items()} == {c: [7] for c in seeds}
    assert len({parse(c, ["--dtype", "float32"])["dtype"] for c in ("convert", "quantize", "sample")}) == 1


@pytest.mark.parametrize("old", sorted(OLD))
def test_old_spellings_are_hidden_aliases(old, capsys):
    commands, argv, new = OLD[old]
    for command in commands:
        if old.startswith("--"):
            assert old not in visible_flags(command)
            rc, out, _ = run_main(capsys, command, "--help")
            assert rc == 0 and old not in out.split()
        a, b = parse(command, argv), parse(command, new)
        notes = options.deprecations(argparse.Namespace(**a))
        assert len(notes) == 1 and "deprecated" in notes[0], notes
        a.pop("_deprecated")
        assert a == b, command


def test_a_deprecated_spelling_logs_a_warning(capsys):
    rc, _, err = run_main(capsys, "bench", "--memory", "--preset", "tiny", "--formats", "int4", "--json")
    assert rc == 0
    assert "pqjax bench: warning: --formats is deprecated and will be removed in the next version; use --format" in err


def test_no_two_flags_of_a_command_share_a_destination():
    """Aliases aside, a destination is set by one visible flag (no hidden synonyms in --help)."""
    for command, sub in SUBPARSERS.items():
        seen = {}
        for a in sub._actions:
            if a.help == argparse.SUPPRESS or not a.option_strings or a.dest == "help":
                continue
            assert a.dest not in seen, (command, a.option_strings, seen.get(a.dest))
            seen[a.dest] = a.option_strings
