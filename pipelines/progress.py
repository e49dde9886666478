"""What a person sees while a search runs: a stage's timed progress lines (`[search 01:23] ...`)
with its counts and best trial so far, and the tables printed when a stage ends."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipelines.records import collapsed_note, routing_warning
from pipelines.schema import SearchSpace
from pipelines.stages import rank_trials
from pipelines.tracking import COMPLETED, FAILED, STOPPED_EARLY_ASHA


def fmt(value: Any) -> str:
    """Floats to 4 significant digits, others as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_params(params: dict[str, Any]) -> str:
    """`name=value ...` for progress lines (a searched `method` is a string)."""
    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


class Progress:
    """One stage's progress lines, timed from its start; `total`: the trials it will run."""

    def __init__(self, space: SearchSpace, stage: str, out: Any = None, total: int = 0) -> None:
        self.space, self.stage, self.out, self.total = space, stage, out or sys.stdout, total
        self.best: dict[str, Any] | None = None  # {"objective", "trial"}: the best search trial
        self.started = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; an open stream may not pickle.
        return {**self.__dict__, "out": None}

    def say(self, text: str, records: dict[str, dict[str, Any]] | None = None) -> None:
        """A line `[stage mm:ss] text`, ending with the stage's counts by status if `records`."""
        if records is not None:
            text += " " + self.counts(records)
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        print(
            f"[{self.stage} {minutes:02d}:{seconds:02d}] {text}",
            file=self.out or sys.stdout,
            flush=True,
        )

    def counts(self, records: dict[str, dict[str, Any]]) -> str:
        by = [r["status"] for r in records.values()]
        return (
            f"[running {by.count('running')} | completed {by.count(COMPLETED)} | "
            f"stopped {by.count(STOPPED_EARLY_ASHA)} | failed {by.count(FAILED)} | "
            f"to go {max(self.total - len(by), 0)}]"
        )

    def adopt_best(self, records: Iterable[dict[str, Any]]) -> None:
        """A resumed search's best so far, from its earlier trials' last objectives."""
        earlier = [
            {"objective": r["last"]["objective"], "trial": r["trial"]}
            for r in records
            if r["run"] is None and "objective" in r["last"]
        ]
        ranked = rank_trials(earlier, self.space.objective.mode)
        self.best = ranked[0] if ranked else None

    def evaluated(self, rec: dict[str, Any], result: dict[str, Any]) -> None:
        """A trial's evaluation; a search trial's line ends with the best trial so far, by
        `rank_trials` (of equal objectives, the earlier trial stays best)."""
        obj, metric = result.get("objective"), self.space.objective.metric
        best = ""
        if rec["run"] is None:  # a search trial (not a stability seed)
            ranked = rank_trials(
                [r for r in (self.best, {"objective": obj, "trial": rec["trial"]}) if r],
                self.space.objective.mode,
            )
            self.best = ranked[0] if ranked else None
            if self.best:
                best = f" | best {self.best['objective']:.4f} (trial {self.best['trial']:02d})"
        self.say(
            f"{rec['name']} eval {rec['evals']}/{self.space.budget.max_evals} step "
            f"{result.get('step')}: {metric}={fmt(result.get(metric))} "
            f"objective={fmt(obj)}{best}"
        )


def print_table(out: Any, space: SearchSpace, rows: list[dict[str, Any]], title: str) -> None:
    """A stage's trials (`pipelines.results.trial_rows`), one line each."""
    metric = space.objective.metric
    names = list(space.search)
    header = ["trial", "status", *names, "evals", "objective", metric]
    table = [
        [
            f"{r['trial']:02d}",
            r["status"],
            *(fmt(r["params"].get(n)) for n in names),
            str(r["evals"]),
            fmt(r["objective"]),
            fmt(r[metric]),
        ]
        for r in rows
    ]
    note, title = collapsed_note(rows), f"{title}: {len(rows)} trials"
    _print_grid(out or sys.stdout, title, header, table, (note,) if note else ())


def print_stability(out: Any, space: SearchSpace, groups: list[dict[str, Any]]) -> None:
    """The stability stage's configurations (`pipelines.results.stability_groups`)."""
    metric = space.objective.metric
    header = ["config", "from trial", f"{metric} mean", "std", "test_acc mean", "std", "score"]
    table = [
        [
            g["group"],
            f"{g['from_trial']:02d}",
            fmt(g["scores"][f"{metric}_mean"]),
            fmt(g["scores"].get(f"{metric}_std")),
            fmt(g["scores"].get("test_accuracy_mean")),
            fmt(g["scores"].get("test_accuracy_std")),
            fmt(g["score"]),
        ]
        for g in groups
    ]
    _print_grid(out or sys.stdout, "stability", header, table)


def _print_grid(
    out: Any, title: str, header: list[str], rows: list[list[str]], notes: tuple[str, ...] = ()
) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join
    print(f"\n{title}", file=out)
    print(line(h.ljust(w) for h, w in zip(header, widths, strict=True)), file=out)
    for row in rows:
        print(line(str(c).ljust(w) for c, w in zip(row, widths, strict=True)), file=out)
    for note in notes:
        print(note, file=out)
    print(file=out, flush=True)


def print_outcome(
    out: Any, best: dict | None, stability: list[dict], output_dir: Path, link: str
) -> None:
    """The search's last lines: the best config, and where its results are."""
    if best:
        print(
            f"best: {best['source']}: {format_params(best['params'])} -> "
            + ", ".join(
                f"{k}={v:.4f}" for k, v in best["scores"].items() if not k.endswith("_seeds")
            ),
            file=out,
        )
        if note := routing_warning(best.get("routing") or {}):
            print(note, file=out)
        if not stability:
            print(
                "test: not evaluated (search trials are chosen on validation only); the "
                "stability stage (stability.top_k_configs > 0) or promotion "
                "(graphlora-promote) reports the test split",
                file=out,
            )
    print(f"results: {output_dir}\nMLflow runs: {link}", file=out, flush=True)
