"""What a run is scored by is what it ships (docs/method.md, "Selection").

A run is scored by its last evaluation; its test figure and its saved adapter are those same final
weights. Checked on a run whose validation score (its loss) is best before its last step: the
reported score is the last evaluation's (not the best one), and the test figures it reports are
what its saved adapter scores on the test split, loaded into a fresh copy of the base model.
"""

from __future__ import annotations

import torch

from graphlora.adapter_io import load_adapter
from graphlora.config import MoELoRAConfig
from graphlora.evaluate import evaluate_examples
from graphlora.models import load_model_and_tokenizer
from graphlora.synthetic import make_synthetic_task
from graphlora.train import TrainConfig, run_training

DATA = make_synthetic_task(n_train=256, n_val=48, n_test=48, seed=3)


def _undo_at(last_step: int):
    """An `on_step` hook that zeroes every LoRA B matrix after the last optimizer step, so the
    run ends on the base model's predictions: a validation peak before the end."""

    def on_step(step: int, model: torch.nn.Module) -> None:
        if step == last_step:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.zero_()

    return on_step


def test_a_run_that_peaks_early_reports_and_ships_its_final_weights(tmp_path):
    cfg = TrainConfig(
        max_steps=61,
        eval_every=60,  # evaluations at steps 60 and 61 (the last step always evaluates)
        batch_size=8,
        learning_rate=3e-3,
        log_every=0,
        output_dir=str(tmp_path / "adapter"),
    )
    seen: list[float] = []

    def on_eval(step: int, metrics: dict) -> bool:
        seen.append(metrics["val_loss"])
        return False

    adapter = MoELoRAConfig(method="graphlora", gcn_hidden=16)
    m = run_training(cfg, adapter, data=DATA, on_eval=on_eval, on_step=_undo_at(61))
    # The premise: the validation loss was best (lowest) at the first evaluation, then rose.
    assert len(seen) == 2 and seen[0] < seen[1] - 0.1, seen
    # Reported: the last evaluation (the weights the run ends with), not the best one.
    assert m["val_loss"] == seen[1]
    # Shipped: the saved adapter is those weights; its test accuracy is the one reported.
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, dtype="float32")
    load_adapter(model, tmp_path / "adapter")
    shipped = evaluate_examples(model, tokenizer, DATA.test, max_length=cfg.max_length)
    assert shipped.accuracy == m["test_accuracy"]
    assert abs(shipped.loss - m["test_loss"]) < 1e-5
