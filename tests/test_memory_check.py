"""The search plans its largest trial's GPU memory before it starts, refuses a space whose
trials cannot fit (one line, non-zero exit, nothing started or recorded), and decides
`gradient_checkpointing: auto` per trial from the GPU's memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.memory_check import largest_params, resolve_checkpointing
from pipelines.stages import SEARCH
from pipelines.validate import load_search_space

ROOT = Path(__file__).resolve().parents[1]


def _paper(tmp_path: Path, gb: float, checkpointing: object) -> Path:
    doc = yaml.safe_load((ROOT / "search_spaces" / "paper.yaml").read_text())
    doc["resources"]["gpu_memory_gb"] = gb
    doc["training"]["gradient_checkpointing"] = checkpointing
    path = tmp_path / "paper-small-gpus.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_paper_space_on_24gb_gpus_is_refused_before_anything_starts(tmp_path):
    space = _paper(tmp_path, 24, "auto")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRAPHLORA_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "search.py"), "--space", str(space)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr[-2000:]
    line = errors[0]
    assert line.startswith(f"error: {space}: resources.gpu_memory_gb:")
    assert "num_experts=32, top_k=5, rank=32" in line  # which values
    assert "GiB per GPU" in line and "24 GB GPUs hold 20.1 GiB" in line  # needed, there is
    assert "batch_size" in line and "larger GPU" in line  # what to change
    assert "memory plan: the largest trial" in proc.stdout
    assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing recorded
    assert not (tmp_path / "home" / "searches").exists()


def test_paper_space_fits_80gb_gpus_with_checkpointing_decided_by_auto(tmp_path):
    space = load_search_space(_paper(tmp_path, 80, "auto"))
    largest = largest_params(space)
    assert (largest["num_experts"], largest["top_k"], largest["rank"]) == (32, 5, 32)
    _, training = SEARCH.configs(space, largest, 0)
    assert training["gradient_checkpointing"] is True  # 7B at 16 x 512 needs it on any GPU


def test_auto_is_decided_per_run_from_the_gpu_memory(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "model: tiny-qwen2\ndataset: synthetic\nmethod: graphlora\n"
        "training: {gradient_checkpointing: auto, batch_size: 8}\n"
        "search:\n  rank: {type: categorical, values: [2, 8]}\n"
        "budget: {trials: 2, max_steps: 4, eval_every: 2}\n"
        "resources: {gpus_per_worker: 1, gpu_memory_gb: GB}\n"
    )
    text = (tmp_path / "s.yaml").read_text()
    for gb, expected in ((0.0001, True), (80, False)):
        (tmp_path / "s.yaml").write_text(text.replace("GB", str(gb)))
        space = load_search_space(tmp_path / "s.yaml")
        adapter, training = space.configs({"rank": 8}, 0)
        resolve_checkpointing(space, adapter, training)
        assert training["gradient_checkpointing"] is expected, gb
    # unknown GPU memory (0), or CPU trials: auto is off
    (tmp_path / "s.yaml").write_text(text.replace("GB", "0"))
    space = load_search_space(tmp_path / "s.yaml")
    _, training = SEARCH.configs(space, {"rank": 8}, 0)
    assert training["gradient_checkpointing"] is False


def test_auto_with_trial_hosts_follows_the_largest_trial(tmp_path):
    """A host's slots share one forward, so one checkpointing setting: with trial hosts every
    run (and the host itself) takes the largest trial's decision, where without hosts each run
    takes its own."""
    from graphlora.config import MoELoRAConfig
    from graphlora.memory import plan_memory
    from graphlora.run import TrainConfig
    from pipelines.memory_check import _shape

    text = (
        "model: tiny-qwen2\ndataset: synthetic\nmethod: graphlora\n"
        "training: {gradient_checkpointing: auto, batch_size: 8}\n"
        "search:\n  rank: {type: categorical, values: [2, 64]}\n"
        "budget: {trials: 2, max_steps: 4, eval_every: 2}\n"
        "resources: {gpus_per_worker: 1, gpu_memory_gb: 1, trials_per_host: HOSTS}\n"
    )
    (tmp_path / "s.yaml").write_text(text.replace("HOSTS", "0"))
    space = load_search_space(tmp_path / "s.yaml")
    totals = []
    for rank in (2, 64):
        adapter, training = space.configs({"rank": rank}, 0)
        shape, _ = _shape(space, {**training, "gradient_checkpointing": False})
        totals.append(plan_memory(training["model"], MoELoRAConfig(**adapter), **shape).total)
    assert totals[0] < totals[1]
    gb = (totals[0] + totals[1]) / 2 / 0.9 / 1e9  # the small trial fits, the large one does not
    for hosts, expected in (("0", (False, True)), ("2", (True, True))):
        (tmp_path / "s.yaml").write_text(
            text.replace("HOSTS", hosts).replace("gpu_memory_gb: 1", f"gpu_memory_gb: {gb!r}")
        )
        space = load_search_space(tmp_path / "s.yaml")
        got = tuple(
            SEARCH.configs(space, {"rank": r}, 0)[1]["gradient_checkpointing"] for r in (2, 64)
        )
        assert got == expected, (hosts, got)
    base = space.configs({}, 0)[1]
    resolve_checkpointing(space, {}, base)  # what the trial host is built with
    assert base["gradient_checkpointing"] is True
    TrainConfig(**base)
