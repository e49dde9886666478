"""Routing health of trained adapters: does the router spread tokens over experts, batch by
batch, and does its choice depend on the token (docs/method.md section 6)?

Trains each method with ``run_training`` (the model's own training and adapter defaults, as
``python -m graphlora.train`` uses them) and prints, per method and seed, every MoE layer's
per-batch load entropy, experts in use (>= 5% of a batch's assignments), distinct top-k sets per
batch and token-expert mutual information over the training batches of the last evaluation
window, the same figures over the held-out validation batches of the last evaluation (model-wide:
mean and minimum over layers), and the test accuracy. The last line printed is one JSON object
with every run's metrics.

    python benchmarks/routing.py --model tiny-qwen2 --dataset synthetic --max-steps 60
    python benchmarks/routing.py --model minilm-l6 --dataset arc-easy --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch

from graphlora.config import MoELoRAConfig
from graphlora.data import load_task
from graphlora.health import HEALTH_FIELDS
from graphlora.presets import adapter_defaults, training_defaults
from graphlora.train import TrainConfig, run_training


def _layers(metrics: dict[str, float]) -> list[int]:
    return sorted(
        int(k.split("/")[0][5:])
        for k in metrics
        if k.endswith("/batch_entropy") and k[:5] == "layer"
    )


def _progress(method: str, seed: int):  # noqa: ANN202
    def on_eval(step: int, m: dict[str, float]) -> None:
        print(
            f"{method} seed {seed} @ {step}: val {m['val_accuracy']:.4f}; batch entropy min "
            f"{m.get('routing/min_batch_entropy', float('nan')):.2f} mean "
            f"{m.get('routing/batch_entropy', float('nan')):.2f}, experts used min "
            f"{m.get('routing/min_experts_used', float('nan')):.1f}, held-out min "
            f"{m.get('val_routing/min_batch_entropy', float('nan')):.2f}, token_mi mean "
            f"{m.get('routing/token_mi', float('nan')):.3f}",
            file=sys.stderr,
            flush=True,
        )

    return on_eval


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/routing.py", description=__doc__)
    p.add_argument("--model", default="tiny-qwen2")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--methods", nargs="+", default=["graphlora-paper", "graphlora"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-steps", type=int, help="default: the model's")
    p.add_argument("--eval-every", type=int, help="default: the model's, or --max-steps")
    p.add_argument("--max-test", type=int, help="test questions (default: the whole split)")
    p.add_argument(
        "--no-step0", action="store_true", help="skip the step-0 evaluation (the same every run)"
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="adapter fields for every method (JSON values), e.g. normal_coef=1.0",
    )
    args = p.parse_args(argv)

    training = {**training_defaults(args.model), "model": args.model, "dataset": args.dataset}
    training["log_every"] = 0
    if args.max_steps:
        training["max_steps"] = args.max_steps
        training["eval_every"] = args.eval_every or training.get("eval_every") or args.max_steps
    if args.max_test:
        training["max_test_examples"] = args.max_test
    training.setdefault("eval_test", True)
    if args.no_step0:
        training["eval_at_start"] = False
    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    data = load_task(args.dataset)
    runs = []
    cfg = TrainConfig.from_dict(training)
    for method in args.methods:
        adapter = {"method": method, **adapter_defaults(args.model, method), **overrides}
        adapter_cfg = MoELoRAConfig.from_dict(adapter)
        for seed in args.seeds:
            cfg = TrainConfig.from_dict({**training, "seed": seed})
            t0 = time.perf_counter()
            m = run_training(cfg, adapter_cfg, data=data, on_eval=_progress(method, seed))
            m["wall_s"] = time.perf_counter() - t0
            runs.append({"method": method, "seed": seed, "adapter": adapter_cfg.to_dict(), **m})
            print(json.dumps({"run": runs[-1]}, default=float), flush=True)  # one line per run
            print(
                f"{method} seed {seed}: test {m.get('test_accuracy', float('nan')):.4f}, "
                f"min batch entropy {m.get('routing/min_batch_entropy', float('nan')):.2f} "
                f"(held out {m.get('val_routing/min_batch_entropy', float('nan')):.2f}) "
                f"in {m['wall_s']:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {date.today()}; model {args.model} on {args.dataset}; "
        f"{cfg.max_steps} steps of {cfg.batch_size}; seeds {args.seeds}\n"
    )
    names = {"batch_entropy": "batch H", "experts_used": "used", "distinct_topk": "top-k sets"}
    names["token_mi"] = "MI"
    print("Training batches of the last window, per layer (batch H / experts used / sets / MI):")
    for run in runs:
        cells = [
            "/".join(f"{run[f'layer{i}/{f}']:.2f}" for f in HEALTH_FIELDS) for i in _layers(run)
        ]
        print(f"  {run['method']} seed {run['seed']}: " + "  ".join(cells))
    print()
    print(
        "| method | seed | min / mean batch H (train) | min experts used (train) | "
        "min / mean batch H (held out) | top-k sets (held out) | test acc. % |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        g = run.get
        print(
            f"| {run['method']} | {run['seed']} | {g('routing/min_batch_entropy', 0):.2f} / "
            f"{g('routing/batch_entropy', 0):.2f} | {g('routing/min_experts_used', 0):.1f} | "
            f"{g('val_routing/min_batch_entropy', 0):.2f} / "
            f"{g('val_routing/batch_entropy', 0):.2f} | {g('val_routing/distinct_topk', 0):.1f} | "
            f"{100 * g('test_accuracy', float('nan')):.2f} |"
        )
    for method in args.methods:
        acc = [r["test_accuracy"] for r in runs if r["method"] == method and "test_accuracy" in r]
        if len(acc) > 1:
            print(
                f"{method}: test {100 * statistics.fmean(acc):.2f} ± "
                f"{100 * statistics.stdev(acc):.2f} over {len(acc)} seeds"
            )
    print(json.dumps({"runs": runs}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
