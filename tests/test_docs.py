"""Every command in the README and docs/ is run or checked (issue #25).

Commands are the lines of ``bash`` code blocks (continuations joined, comments dropped, ``&&``
chains split) and the inline code spans of prose that start like one (``diffrl SUB …``,
``python scripts/…``, ``accelerate launch``, ``torchrun``). Each is, by what it needs:

- run as written, in a scratch folder, when it is short and needs only the shipped tiny models
  (``diffrl eval tiny --suite toy-geneval``, the SVDD sampling commands, ``--help``);
- checked to the point where a real run would start loading models: ``diffrl train CONFIG
  overrides`` (and ``accelerate launch``/``torchrun scripts/train.py CONFIG``) resolve and validate
  their config with ``--print-config``; any other ``diffrl`` command parses with the CLI's own
  parser; ``python scripts/X.py args`` parses with the script's own argparse parser (the script is
  run until its ``parse_args`` returns);
- or named in ``NOT_RUN`` with the reason (installing, the suite itself), which must stay in use.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from diffrl.cli import build_parser, main

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = re.compile(r"^(diffrl [a-z-]+|python scripts/|accelerate launch |torchrun )")
NOT_RUN = {
    "python3 -m venv .venv": "the install itself (CI's first command)",
    ". .venv/bin/activate": "the install itself",
    'pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]"': "the install itself",
    "pytest -q": "the test suite itself",
    "python -m venv .venv-trl": "a second environment with trl, for the trl benchmark",
    ".venv-trl/bin/pip install torch==2.14.1 torchvision==0.29.1 -e . trl==0.23.1": "installing trl",
}
SHIPPED = ("tiny", "tiny-lcm", "tiny-flow")
RUN_SUBCOMMANDS = ("eval", "sample", "train-value")


def bash_blocks(text: str) -> list[str]:
    """The command lines of ```bash blocks: continuation lines joined, comments and blanks dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def inline_commands(text: str) -> list[str]:
    """Inline code spans of prose (outside code blocks) that start like a command, across line
    breaks; messages quoted from the tool (with ``error``, ``WARNING`` or a parenthesis) are not
    commands."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    return [
        s
        for s in spans
        if STARTS.match(s)
        and len(s.split()) > (1 if s.startswith("python scripts/") else 2)  # `diffrl eval` alone is a name
        and not any(m in s for m in ("error", "WARNING", "("))
    ]


def commands() -> list[tuple[str, str]]:
    """(page, command) for every command of every page, ``&&`` chains split, in page order."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for command in [*bash_blocks(text), *inline_commands(text)]:
            found += [(page.name, part.strip()) for part in command.split("&&")]
    return found


def how(command: str) -> str:
    """``skip``, ``run``, ``config``, ``parse`` or ``script`` (see the module docstring)."""
    words = shlex.split(command)
    if command in NOT_RUN:
        return "skip"
    if words[0] in ("accelerate", "torchrun"):
        return "config"
    if words[0].endswith("python") and words[1].startswith("scripts/"):
        return "script"
    assert words[0] == "diffrl", f"a command the docs test does not know how to check: {command!r}"
    sub, rest = words[1], words[2:]
    if sub == "train":
        return "config" if rest and rest[0].endswith(".yaml") else "parse"
    placeholder = any(re.search(r"\b[A-Z_]{3,}\b", w) for w in rest if not w.startswith("-"))
    runs = next((i for i, w in enumerate(rest) if w.startswith("-")), len(rest)) > 1  # MODEL RUN...
    if sub in RUN_SUBCOMMANDS and rest and rest[0] in SHIPPED and not placeholder and not runs:
        return "run"
    return "parse"


ALL = commands()


def test_the_pages_have_commands_and_every_exempt_one_is_still_in_them():
    kinds = {how(c) for _, c in ALL}
    assert {"run", "config", "parse", "script"} <= kinds
    assert {c for _, c in ALL if c in NOT_RUN} == set(NOT_RUN), "NOT_RUN names a command the docs dropped"


def train_arguments(command: str) -> list[str]:
    """The ``diffrl train`` arguments of a train / accelerate / torchrun command, config path
    made absolute (the command may name a placeholder such as CONFIG)."""
    words = shlex.split(command)
    if words[0] != "diffrl":
        words = words[next(i for i, w in enumerate(words) if w.endswith("scripts/train.py")) + 1 :]
    else:
        words = words[2:]
    return [str(ROOT / w) if w.endswith(".yaml") else w for w in words]


def parse_script(command: str, monkeypatch) -> None:
    """Run ``python scripts/X.py args`` until its argparse parser returns the arguments."""

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    words = shlex.split(command)
    script = ROOT / words[1]
    assert "parse_args" in script.read_text(), f"{script.name} has no argparse parser to stop at"
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [str(script), *words[2:]])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    with pytest.raises(Parsed):
        runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("page, command", [pc for pc in ALL if how(pc[1]) != "run"], ids=lambda v: v[:70])
def test_a_documented_command_is_valid(page, command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    kind = how(command)
    if kind == "skip":
        return
    if kind == "script":
        return parse_script(command, monkeypatch)
    if kind == "config":
        arguments = train_arguments(command)
        if arguments[0] == "CONFIG":
            assert all("=" in w for w in arguments[1:]), command
            return
        assert main(["train", *arguments, "--print-config"]) == 0, capsys.readouterr().err
        return
    words = shlex.split(command)[1:]
    try:
        args, extra = build_parser().parse_known_args(words)
    except SystemExit as exit:
        assert exit.code == 0, f"{page}: {command}: {capsys.readouterr().err}"
        return
    assert not extra or words[0] == "train", f"{page}: {command}: unrecognized {extra}"


def test_the_short_documented_commands_run(tmp_path, monkeypatch, capsys):
    """In page order, in one scratch folder (``train-value`` writes the value net that the next
    ``sample --guidance svdd-mc`` reads)."""
    monkeypatch.chdir(tmp_path)
    ran = list({c: (page, c) for page, c in ALL if how(c) == "run"}.values())  # each command once
    assert len(ran) >= 4
    for page, command in ran:
        code = main(shlex.split(command)[1:])
        assert code == 0, f"{page}: {command}: {capsys.readouterr().err}"
