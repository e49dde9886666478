"""Training-state checkpoints: a run resumed from step k ends exactly where an uninterrupted run
ends, and a checkpoint of another configuration is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graphlora.adapter_io import WEIGHTS_NAME
from graphlora.checkpoint import STATE_NAME, CheckpointError
from graphlora.config import MoELoRAConfig
from graphlora.synthetic import make_synthetic_task
from graphlora.train import TrainConfig, run_training

DATA = make_synthetic_task(n_train=40, n_val=8, n_test=8)
ADAPTER = dict(method="graphlora", num_experts=4, top_k=2, rank=2, dropout=0.1, gcn_hidden=16)


def _cfg(tmp: Path, name: str, **kw) -> TrainConfig:
    base = dict(
        max_steps=6,
        batch_size=4,
        eval_every=2,
        max_eval_examples=8,
        max_test_examples=8,
        log_every=0,
        output_dir=str(tmp / name),
    )
    return TrainConfig(**{**base, **kw})


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    saved: dict[int, Path] = {}

    def keep(step: int, metrics: dict, state_dir: Path | None) -> None:
        assert state_dir is not None and (state_dir / STATE_NAME).is_file()
        saved[step] = Path(shutil.copytree(state_dir, tmp_path / f"ckpt{step}"))

    full = run_training(
        _cfg(tmp_path, "full"), MoELoRAConfig(**ADAPTER), data=DATA, on_eval=keep, checkpoint=True
    )
    assert sorted(saved) == [2, 4, 6]
    assert full["checkpoint_time_s"] > 0
    # A checkpoint is also a loadable adapter folder.
    assert (saved[2] / WEIGHTS_NAME).is_file()

    resumed = run_training(
        _cfg(tmp_path, "resumed"), MoELoRAConfig(**ADAPTER), data=DATA, resume_from=saved[2]
    )
    for key in ("val_accuracy", "val_loss", "train_loss", "test_accuracy", "best_val_accuracy"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    a = load_file(str(tmp_path / "full" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "resumed" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    # Resumed at the very end: nothing left to train, the final metrics come from the state.
    done = run_training(
        _cfg(tmp_path, "done"), MoELoRAConfig(**ADAPTER), data=DATA, resume_from=saved[6]
    )
    assert done["val_accuracy"] == pytest.approx(full["val_accuracy"])


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    saved: list[Path] = []
    run_training(
        _cfg(tmp_path, "a", max_steps=2),
        MoELoRAConfig(**ADAPTER),
        data=DATA,
        checkpoint=True,
        on_eval=lambda s, m, d: saved.append(Path(shutil.copytree(d, tmp_path / "ck"))),
    )
    with pytest.raises(CheckpointError, match="learning_rate=0.003 there, 0.0001 here"):
        run_training(
            _cfg(tmp_path, "b", max_steps=2, learning_rate=1e-4),
            MoELoRAConfig(**ADAPTER),
            data=DATA,
            resume_from=saved[0],
        )
    with pytest.raises(CheckpointError, match="another adapter configuration"):
        run_training(
            _cfg(tmp_path, "c", max_steps=2),
            MoELoRAConfig(**{**ADAPTER, "rank": 4}),
            data=DATA,
            resume_from=saved[0],
        )
    (saved[0] / STATE_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        run_training(
            _cfg(tmp_path, "d", max_steps=2),
            MoELoRAConfig(**ADAPTER),
            data=DATA,
            resume_from=saved[0],
        )
