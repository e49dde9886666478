"""The stages a configuration goes through, and the rules each one owns.

A search trial is chosen on validation and never sees the test split (a test figure on every
trial invites choosing on it, and costs every ASHA-stopped trial a test pass); the stability
stage re-runs the top configurations with fresh seeds and reports test; the promotion trains the
winner for real and reports test. Each stage says here which splits its runs evaluate (and so
which datasets its MLflow runs name as inputs), how its seeds are derived, and the `kind` tag of
its runs; `rank_trials` is the one order of "best first" every stage uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.schema import SearchSpace


@dataclass(frozen=True)
class Stage:
    """One stage's rules.

    Attributes:
        kind: the `kind` tag of its MLflow runs.
        eval_test: whether its runs evaluate the test split (`TrainConfig.eval_test`).
        seed_offset: its seeds count up from the first seed plus this (fresh seeds for the
            stability stage, so a configuration is not judged on the seeds it won with).
    """

    kind: str
    eval_test: bool
    seed_offset: int = 0

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits its runs use: the lineage contexts of their MLflow dataset inputs."""
        return ("train", "validation", "test") if self.eval_test else ("train", "validation")

    def configs(
        self, space: SearchSpace, params: Mapping[str, Any], seed: int
    ) -> tuple[dict, dict]:
        """(adapter, training) of one of its runs: the space's (`SearchSpace.configs`), with
        this stage's `eval_test` and `gradient_checkpointing: auto` decided for the run."""
        from pipelines.memory_check import resolve_checkpointing

        adapter, training = space.configs(params, seed)
        training["eval_test"] = self.eval_test
        resolve_checkpointing(space, adapter, training)  # `auto`: on where the GPU needs it
        return adapter, training

    def seeds(self, first: int, count: int) -> tuple[int, ...]:
        """The `count` training seeds of one configuration, from `first` (the space's seed)."""
        return tuple(first + self.seed_offset + i for i in range(count))


SEARCH = Stage("search", eval_test=False)
STABILITY = Stage("stability", eval_test=True, seed_offset=100)
PROMOTION = Stage("final", eval_test=True)  # `--seeds 3` is seeds 0, 1, 2
STAGES = {s.kind: s for s in (SEARCH, STABILITY, PROMOTION)}


def rank_trials(rows: Iterable[dict[str, Any]], mode: str, key: str = "objective") -> list[dict]:
    """Rows that have a `key` value and did not fail, best first (`mode`: max or min); rows
    that tie keep their order, so the first of equals wins.

    Args:
        rows: trials (`SearchMonitor.rows`), stability groups (`key="score"`), or a
            promotion's seeds (`key` its objective metric).
        mode: the objective's mode.
        key: the value to rank on.
    """
    done = [r for r in rows if r.get("status") != "failed" and r.get(key) is not None]
    return sorted(done, key=lambda r: r[key], reverse=mode == "max")
