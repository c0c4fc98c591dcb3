"""One meaning per option name across every command: the app is walked and each option checked against the one
vocabulary (vitseg_export/cli/options.py): declared there, its help that term's help (only the command's noun
differs), one type everywhere, help on every option and argument; old spellings rewritten with a note; an option
given for an export it does not apply to refused whatever its value (the parser's parameter source, not the value)."""

from __future__ import annotations

import re
import typing

import pytest
import typer.main
from typer.testing import CliRunner

from vitseg_export.cli import app
from vitseg_export.cli.options import DEPRECATED, VOCABULARY, modernize
from vitseg_export.errors import VitsegError


def _commands():
    root = typer.main.get_command(app)
    yield "vitseg", root
    yield from root.commands.items()


def _options():
    for name, command in _commands():
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                yield name, param


def _base_type(annotation):
    """Optional[X] -> X; the type an option takes on the command line."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def test_every_option_is_in_the_vocabulary_with_its_help():
    wrong = []
    for command, param in _options():
        flag = param.opts[0]
        term = VOCABULARY.get(flag)
        if term is None:
            wrong.append(f"{command} {flag}: not in cli/options.py VOCABULARY")
            continue
        declared = tuple("/".join(param.opts + param.secondary_opts).split("/"))
        if sorted(declared) != sorted("/".join(term.flags).split("/")):
            wrong.append(f"{command} {flag}: spelled {declared}, the vocabulary {term.flags}")
        pattern = "^" + ".*".join(re.escape(part) for part in term.help.split("{noun}")) + "$"
        if not re.match(pattern, param.help or "", re.S):
            wrong.append(f"{command} {flag}: help {param.help!r} is not the vocabulary's {term.help!r}")
    assert not wrong, "\n".join(wrong)


def test_one_type_per_option_name():
    types: dict[str, dict] = {}
    for command, param in _options():
        types.setdefault(param.opts[0], {})[command] = _base_type(param.type_descriptor.annotation)
    mixed = {flag: seen for flag, seen in types.items() if len(set(seen.values())) > 1}
    assert not mixed, mixed


def test_every_option_and_argument_has_help():
    missing = [f"{name} {'/'.join(p.opts) or p.name}" for name, command in _commands() for p in command.params
               if p.name != "help" and not (p.help or "").strip()]
    assert not missing, missing


def test_the_vocabulary_has_no_unused_term():
    used = {param.opts[0] for _, param in _options()}
    assert set(VOCABULARY) - used == set()


def test_old_spellings_name_options_that_exist_now_and_are_gone():
    commands = dict(_commands())
    for command, renames in DEPRECATED.items():
        flags = {o for p in commands[command].params for o in p.opts + p.secondary_opts}
        for old, new in renames.items():
            assert new in flags, (command, new)
            assert old not in flags or (old, new) == ("--json", "--report"), (command, old)  # `--json FILE` only


@pytest.mark.parametrize("argv, expected, notes", [
    (["export", "ckpt", "--device", "gpu", "--name=m"], ["export", "ckpt", "--triton-device", "gpu", "--triton-name=m"], 2),
    (["profile", "a.onnx", "--json", "out.json"], ["profile", "a.onnx", "--report", "out.json"], 1),
    (["profile", "a.onnx", "--json"], ["profile", "a.onnx", "--json"], 0),
    (["profile", "a.onnx", "--batch", "1,4", "--model", "x"], ["profile", "a.onnx", "--batch-sizes", "1,4", "--served-model", "x"], 2),
    (["verify", "a.onnx", "--", "--model"], ["verify", "a.onnx", "--", "--model"], 0),
    (["train", "--model", "segformer-b0"], ["train", "--model", "segformer-b0"], 0),
])
def test_old_spellings_are_rewritten_with_a_note(argv, expected, notes):
    out, said = modernize(argv)
    assert out == expected
    assert len(said) == notes and all("deprecated" in n and "next release" in n for n in said)


@pytest.mark.parametrize("args, flag", [
    (["--dla-core", "0"], "--dla-core"),
    (["--triton-queue-delay-us", "0"], "--triton-queue-delay-us"),
    (["--min-agreement", "0"], "--min-agreement"),
    (["--calib-images", "32"], "--calib-images"),  # the default value, given: still refused
    (["--triton-device", "cpu"], "--triton-device"),
])
def test_an_option_given_for_an_export_it_does_not_apply_to_is_refused_whatever_its_value(args, flag):
    result = CliRunner().invoke(app, ["export", "segformer-b0-test", "--format", "onnx", "--precision", "fp32", *args])
    assert isinstance(result.exception, VitsegError), result.output
    assert result.exception.message.startswith(f"{flag} applies to ") and "not --format onnx" in result.exception.message


def test_a_wrong_choice_is_the_parsers_one_line_error_listing_the_choices():
    result = CliRunner().invoke(app, ["export", "x", "--precision", "int4"])
    assert result.exit_code == 2
    assert "int4" in result.output and "fp32" in result.output and "int8" in result.output


def test_version():
    from vitseg_export import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"vitseg {__version__}"


def test_docs_cli_md_is_generated_from_the_app_and_current():
    """docs/cli.md is Typer's Markdown of this app; a changed option or help text without regenerating it fails."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "cli_docs.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "docs/cli.md is stale: run `python scripts/cli_docs.py`" + proc.stderr[-2000:]
