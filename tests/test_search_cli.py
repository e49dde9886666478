"""`python pipelines/search.py` refuses bad input before anything starts: one `error:` line on
stderr, exit status 2, Ray never started, nothing recorded in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import search
from pipelines.search import main
from pipelines.tracking import tracking_uri

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = (REPO / "search_spaces" / "quickstart.yaml").read_text()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRAPHLORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    # Not `ray.is_initialized()`: the e2e tests' session cluster may be up in this process.
    monkeypatch.setattr(search, "init_ray", no_ray)
    return tmp_path / "home"


def _space(tmp_path: Path, old: str = "", new: str = "") -> str:
    assert old in QUICKSTART
    path = tmp_path / "space.yaml"
    path.write_text(QUICKSTART.replace(old, new))
    return str(path)


def _refused(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


def _no_runs() -> None:
    """Nothing recorded: no MLflow run anywhere in the store (the store may not even exist)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(ids) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("model: tiny-qwen2", "model: [tiny", ("malformed YAML", "line")),
        ("seed: 0", "seed: 0\nsearch_budget: 3", ("search_budget", "unknown key")),
        (
            "top_k: {type: int, low: 1, high: 4}",
            "top_k: {type: int, low: 9, high: 12}",
            ("search.top_k.low", "line 17"),
        ),
        ("method: graphlora", "method: graphlorra", ("method", "graphlorra", "graphlora")),
        ("model: tiny-qwen2", "model: no-such-org/no-such-model", ("model:", "no-such-model")),
        ("model: tiny-qwen2", "model: ./no/such/dir", ("model:", "does not exist")),
        ("dataset: synthetic", "dataset: ./missing.json", ("dataset:", "missing.json")),
        ("dataset: synthetic", "dataset: no-such-task", ("dataset:", "no-such-task")),
    ],
    ids=[
        "malformed",
        "unknown-key",
        "impossible-top-k",
        "unknown-method",
        "unknown-model",
        "missing-model-dir",
        "missing-dataset-file",
        "unknown-dataset",
    ],
)
def test_bad_space_is_refused_before_anything_starts(
    home, tmp_path, capsys, old, new, expected
) -> None:
    _refused(capsys, ["--space", _space(tmp_path, old, new)], *expected)
    _no_runs()


@pytest.mark.parametrize(
    ("model", "words"),
    [("tiny-bert", ("encoder", "trials_per_host: 0")), ("tiny-gpt2", ("dropout", "Qwen2"))],
)
def test_a_model_that_cannot_be_packed_is_refused_with_trial_hosts(
    home, tmp_path, capsys, model, words
) -> None:
    space = _space(tmp_path, "model: tiny-qwen2", f"model: {model}")
    _refused(capsys, ["--space", space, "--trials-per-host", "2"], "trials_per_host", *words)
    _no_runs()


def test_corrupt_dataset_file_is_refused(home, tmp_path, capsys) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "q", "answer": ')
    line = _refused(
        capsys, ["--space", _space(tmp_path, "dataset: synthetic", f"dataset: {bad}")], "dataset:"
    )
    assert "broken.json" in line
    _no_runs()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:1", "no Ray cluster answers there"),
        ("http://127.0.0.1:8265", "job server"),
        ("not-an-address", "RAY_ADDRESS=not-an-address"),
    ],
    ids=["refused", "dashboard-url", "malformed"],
)
def test_unreachable_ray_address_is_refused(home, capsys, monkeypatch, address, expected) -> None:
    monkeypatch.setenv("RAY_ADDRESS", address)
    _refused(capsys, ["--space", str(REPO / "search_spaces" / "quickstart.yaml")], expected)
    _no_runs()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://127.0.0.1:1", "unreachable"),
        ("file:///tmp/mlruns", "file store is deprecated"),
    ],
    ids=["unreachable", "file-store"],
)
def test_bad_tracking_uri_is_refused(home, capsys, monkeypatch, uri, expected) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _refused(capsys, ["--space", str(REPO / "search_spaces" / "quickstart.yaml")], expected)


@pytest.mark.parametrize(
    ("where", "url", "expected"),
    [
        ("flag", "not-a-url", "is not a database URL"),
        ("env", "postgresql://u:pw@127.0.0.1:1/db", "is unreachable"),
        ("space", "oracle://u@h/db", "'oracle' is not supported"),
    ],
)
def test_bad_optuna_storage_is_refused(home, tmp_path, capsys, monkeypatch, where, url, expected):
    """From the flag, GRAPHLORA_OPTUNA_STORAGE or the space's optuna_storage: one line, no
    password in it, before Ray starts or MLflow records anything."""
    monkeypatch.delenv("GRAPHLORA_OPTUNA_STORAGE", raising=False)
    argv = ["--space", _space(tmp_path)]
    if where == "flag":
        argv += ["--optuna-storage", url]
    elif where == "env":
        monkeypatch.setenv("GRAPHLORA_OPTUNA_STORAGE", url)
    else:
        argv = ["--space", _space(tmp_path, "seed: 0", f"seed: 0\noptuna_storage: {url}")]
    assert "pw@" not in _refused(capsys, argv, "Optuna storage", expected)
    _no_runs()


def test_optuna_storage_in_a_space_must_be_text(home, tmp_path, capsys) -> None:
    _refused(capsys, ["--space", _space(tmp_path, "seed: 0", "seed: 0\noptuna_storage: 5")],
             "optuna_storage")  # fmt: skip


def test_resume_of_unknown_search_is_refused(home, capsys) -> None:
    _refused(capsys, ["--resume", "no-such-search"], "no search found", "no-such-search")
    _no_runs()


def test_cli_exit_status_and_single_line(home, tmp_path) -> None:
    """The real command line: exit status 2 and one line on stderr, nothing on stdout."""
    env = {**os.environ, "GRAPHLORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    space = _space(tmp_path, "rank: {type: categorical", "rank: {type: categorial")
    proc = subprocess.run(
        [sys.executable, "pipelines/search.py", "--space", space],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "search.rank.type" in proc.stderr


def _saved_search(home: Path, finished: bool) -> str:
    """A search folder as a search leaves it (search.json + space.yaml), without running one."""
    import json

    folder = home / "searches" / "made-earlier"
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(QUICKSTART)
    state = {"name": "made-earlier", "space_file": "quickstart.yaml", "finished": finished}
    (folder / search.STATE_FILE).write_text(json.dumps(state))
    return "made-earlier"


def test_resume_and_extend_flags_are_checked_before_anything_starts(home, capsys) -> None:
    done = _saved_search(home, finished=True)
    _refused(capsys, ["--resume", done], "already finished", "--trials N")
    _refused(capsys, ["--resume", done, "--trials", "0"], "--trials 0")
    _refused(capsys, ["--resume", done, "--warm-start", "x"], "--warm-start starts a new search")
    (home / "searches" / done / search.STATE_FILE).write_text(
        '{"name": "made-earlier", "space_file": "quickstart.yaml"}'
    )
    _refused(capsys, ["--resume", done, "--trials", "2"], "has not finished", f"--resume {done}")
    _no_runs()


def test_warm_start_from_an_unknown_search_is_refused(home, capsys) -> None:
    space = str(REPO / "search_spaces" / "quickstart.yaml")
    _refused(capsys, ["--space", space, "--warm-start", "nothing-like-it"], "--warm-start nothing")
    _no_runs()


def test_plan_prints_what_the_space_runs_and_starts_nothing(home, capsys) -> None:
    assert main(["--plan", "--trials", "3"]) == 0  # the default space: the shipped quickstart
    out = capsys.readouterr().out
    assert "search_spaces/quickstart.yaml" in out
    assert "trials: 3 (Optuna TPE, seed 0), each up to 160 steps" in out
    assert "rungs at evaluation 1, 2, 4" in out
    assert "learning_rate: loguniform" in out and "trial hosts:" in out
    assert "(not started)" in out
    assert not (home / "mlflow.db").exists()  # nothing recorded, not even an empty store


def test_plan_of_a_bad_space_is_the_same_one_line_error(home, tmp_path, capsys) -> None:
    bad = _space(tmp_path, "rank: {type: categorical", "rank: {type: categorial")
    _refused(capsys, ["--plan", "--space", bad], "search.rank.type")
    _refused(capsys, ["--plan", "--space", "no-such-space"], "no-such-space", "quickstart")


def test_a_shipped_space_by_name_from_any_folder(home, tmp_path) -> None:
    env = {**os.environ, "GRAPHLORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.search", "--plan", "--space", "real_cpu.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"space: {REPO / 'search_spaces' / 'real_cpu.yaml'}" in proc.stdout


def test_list_shows_the_searches_in_the_store(home, capsys) -> None:
    from pipelines.tracking import Tracker

    assert main(["--list"]) == 0
    assert "no searches recorded there yet" in capsys.readouterr().out
    tracker = Tracker("graphlora-test")
    done = tracker.start_run(
        "search done-1",
        params={"trials": 3},
        tags={"kind": "search", "status": "running", "search_name": "done-1"},
    )
    for i in range(3):
        tracker.start_run(f"trial {i}", parent_run_id=done, tags={"kind": "search"})
    tracker.start_run("stability", parent_run_id=done, tags={"kind": "stability"})
    tracker.log_metrics(done, {"best_objective": 0.875})
    tracker.finish(done, "completed")
    cut = tracker.start_run(
        "search cut-2",
        params={"trials": 6},
        tags={"kind": "search", "status": "running", "search_name": "cut-2"},
    )
    tracker.start_run("trial 0", parent_run_id=cut, tags={"kind": "search"})
    tracker.finish(cut, "interrupted", "SIGINT")
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"MLflow store: {tracking_uri()}"
    assert lines[1].split()[:5] == ["search", "experiment", "status", "trials", "best"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["done-1"][1:5] == ["graphlora-test", "completed", "3/3", "0.8750"]
    assert rows["cut-2"][1:5] == ["graphlora-test", "interrupted", "1/6", "-"]
    assert list(rows) == ["cut-2", "done-1"]  # newest first
