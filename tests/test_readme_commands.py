"""Every command the docs show runs: `--help` works and lists every flag the docs use with it, and
a search command that names a space passes `--plan` (the space validates, nothing starts).

The commands are read from the fenced shell blocks of README.md and docs/*.md: `python
pipelines/<cli>.py ...`, `python -m graphlora.<module> ...` / `python -m pipelines.<module> ...`
and the installed `graphlora-*` commands (run here through their `[project.scripts]` entry, so
this needs no install)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# pyproject.toml's [project.scripts] (no tomllib before Python 3.11): name = "module:function"
_SECTION = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
SCRIPTS = dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', _SECTION, re.M))
FENCE = re.compile(r"^[ \t]*```(?:bash|sh|shell|console)[ \t]*\n(.*?)^[ \t]*```", re.M | re.S)
COMMAND = re.compile(
    r"(?:^|\s)(?:python3?\s+(?P<script>pipelines/\w+\.py)|python3?\s+-m\s+(?P<module>"
    r"(?:graphlora|pipelines)[\w.]*)|(?:^\s*(?:\w+=\S*\s+)*|\s--\s+)(?P<entry>graphlora-[\w-]+))"
    r"(?P<rest>(?:\s.*)?)$"
)


def _commands() -> dict[str, set[str]]:
    """command -> the flags the docs use with it, and the argument lists that give a space."""
    found: dict[str, dict] = {}
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s#.*$", "", line)  # a trailing comment
                for part in re.split(r"&&|\|\||;|\|", line):
                    match = COMMAND.search(part)
                    if not match:
                        continue
                    name = match["script"] or match["module"] or match["entry"]
                    if match["module"] == "pipelines.search":
                        name = "pipelines/search.py"
                    args = shlex.split(match["rest"])
                    entry = found.setdefault(name, {"flags": set(), "spaces": set(), "where": doc})
                    entry["flags"].update(a.split("=")[0] for a in args if a.startswith("--"))
                    if "--space" in args and not any("<" in a for a in args):
                        entry["spaces"].add(tuple(args))
    return found


def _argv(name: str) -> list[str]:
    if name.endswith(".py"):
        return [sys.executable, name]
    if name.startswith("graphlora-"):
        assert name in SCRIPTS, f"the docs show `{name}`, which pyproject.toml does not install"
        module, func = SCRIPTS[name].split(":")
        code = (
            f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
        )
        return [sys.executable, "-c", code]
    return [sys.executable, "-m", name]


def _run(argv: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAPHLORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


COMMANDS = _commands()


def test_the_readme_shows_the_installed_commands() -> None:
    for name in SCRIPTS:
        assert name in COMMANDS, f"no shell block of the docs shows `{name}`"


@pytest.mark.slow
def test_every_documented_command_knows_its_flags(tmp_path: Path) -> None:
    names = sorted(COMMANDS)
    plans = [
        (name, args) for name in names for args in sorted(COMMANDS[name]["spaces"])
    ]  # the search commands that name a space
    with ThreadPoolExecutor(max_workers=2) as pool:
        helps = pool.map(lambda n: _run([*_argv(n), "--help"], tmp_path), names)
        helps = dict(zip(names, helps, strict=True))
        planned = list(pool.map(lambda p: _run([*_argv(p[0]), *p[1], "--plan"], tmp_path), plans))
    problems = []
    for name in names:
        proc = helps[name]
        if proc.returncode != 0:
            problems.append(f"{name} --help: exit {proc.returncode}: {proc.stderr[-500:]}")
            continue
        missing = sorted(f for f in COMMANDS[name]["flags"] if f not in proc.stdout)
        if missing:
            problems.append(f"{name}: {COMMANDS[name]['where'].name} uses {missing}, not in --help")
    for (name, args), proc in zip(plans, planned, strict=True):
        # A Hub model cannot be checked offline; the space itself was validated before that.
        offline = "offline mode is on" in proc.stderr
        if proc.returncode != 0 and not offline:
            problems.append(f"{name} {shlex.join(args)} --plan: exit {proc.returncode}: "
                            f"{proc.stderr[-500:]}")  # fmt: skip
    assert not problems, "\n".join(problems)
