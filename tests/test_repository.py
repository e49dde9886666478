"""Checks on the repository itself: it stands on its own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A folder beside the clone that users do not have: the project must not point at it.
OUTSIDE = re.compile(rb"\.\./shared\b|\bshared/(datasets|SPEC\.md|STYLE\.md|designs|hooks)\b")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60, check=False
    )
    if listing.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout")
    return [name for name in listing.stdout.decode().split("\0") if name]


def test_nothing_tracked_points_outside_the_clone() -> None:
    # CI's own script (.ci/) may set up what sits beside the clone; nothing else may need it.
    offenders = []
    for name in _tracked_files():
        path = REPO / name
        if name.startswith(".ci/") or not path.is_file():  # deleted in the working tree
            continue
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{number}: {line.decode(errors='replace').strip()}")
    assert not offenders, (
        "these lines refer to a folder beside the clone that users do not have; use the "
        "project's own copy (graphlora/task_data/, docs/method.md):\n" + "\n".join(offenders)
    )


@pytest.mark.slow
def test_a_built_wheel_ships_the_benchmark_files(tmp_path: Path) -> None:
    """A plain (non-editable) install finds the task data inside the installed package."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # build from a copy: setuptools writes build/ next to the sources
    for name in _tracked_files():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    for path in (REPO / "graphlora" / "task_data").rglob("*"):  # also before it is committed
        if path.is_file():
            (source / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / path.relative_to(REPO))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("graphlora-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for task in ("ARC-Challenge", "boolq", "piqa", "winogrande"):
        assert f"graphlora/task_data/commonsense/{task}/test.json" in names
    assert "graphlora/task_data/README.md" in names
    # The memory plan's model configs, with their licence notice, so it plans offline.
    for config in ("qwen2-7b", "llama-3-8b"):
        assert f"graphlora/model_configs/{config}/config.json" in names
    assert "graphlora/model_configs/NOTICE" in names
    # The shipped spaces and the commands come with it, so `graphlora-search` runs anywhere.
    for space in ("quickstart", "paper", "compare", "real_cpu"):
        assert f"pipelines/search_spaces/{space}.yaml" in names
    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = (tmp_path / "site" / entry_points).read_text()
    for command in ("graphlora-search", "graphlora-promote", "graphlora-train"):
        assert f"{command} = " in scripts
    # Load from the unpacked wheel, away from the checkout and with no data dir set.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import graphlora.data as d; "
        "from pipelines.validate import resolve_space; print(resolve_space('quickstart')); "
        "s = d.load_task('piqa'); print(d.__file__); print(s.source, len(s.test))"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRAPHLORA_DATA_DIR"}
    run = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    space, where, loaded = run.stdout.strip().splitlines()[-3:]
    assert space == str(tmp_path / "site" / "pipelines" / "search_spaces" / "quickstart.yaml")
    site = tmp_path / "site" / "graphlora"
    assert where == str(site / "data.py")
    assert loaded == f"local:{site / 'task_data' / 'commonsense' / 'piqa'} 551"
