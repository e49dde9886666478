"""Each stage's rules (pipelines/stages.py): which splits it evaluates, its seeds, and the one
ranking every stage uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.stages import PROMOTION, SEARCH, STABILITY, STAGES, rank_trials
from pipelines.validate import load_search_space

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"


def test_only_the_search_never_sees_test():
    assert SEARCH.splits == ("train", "validation") and not SEARCH.eval_test
    for stage in (STABILITY, PROMOTION):
        assert stage.eval_test and stage.splits == ("train", "validation", "test")
    assert STAGES == {"search": SEARCH, "stability": STABILITY, "final": PROMOTION}


def test_seeds_count_up_and_stability_takes_fresh_ones():
    assert SEARCH.seeds(3, 2) == (3, 4)
    assert STABILITY.seeds(3, 2) == (103, 104)
    assert PROMOTION.seeds(0, 3) == (0, 1, 2)


@pytest.mark.parametrize("stage", [SEARCH, STABILITY, PROMOTION], ids=lambda s: s.kind)
def test_a_stage_run_is_the_spaces_configuration_with_its_eval_test(stage):
    space = load_search_space(QUICKSTART)
    adapter, training = stage.configs(space, {}, 7)
    plain_adapter, plain_training = space.configs({}, 7)
    assert adapter == plain_adapter
    assert training == {**plain_training, "eval_test": stage.eval_test}


@pytest.mark.parametrize(("mode", "order"), [("max", [2, 0, 3]), ("min", [3, 0, 2])])
def test_rank_trials_leaves_out_failed_and_unmeasured_and_keeps_ties_in_order(mode, order):
    rows = [
        {"trial": 0, "status": "completed", "objective": 0.5},
        {"trial": 1, "status": "failed", "objective": 0.9},
        {"trial": 2, "status": "completed", "objective": 0.7},
        {"trial": 3, "status": "stopped_early_asha", "objective": 0.5 if mode == "max" else 0.1},
        {"trial": 4, "status": "completed", "objective": None},
    ]
    # max: trial 3 ties trial 0, and the first of equals stays first
    assert [r["trial"] for r in rank_trials(rows, mode)] == order
    groups = [{"group": "a", "score": 1.0}, {"group": "b", "score": 2.0}]
    assert rank_trials(groups, "max", "score")[0]["group"] == "b"


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_best_so_far_progress_line_keeps_the_earlier_of_equal_trials(mode):
    """The search's "best so far" is `rank_trials`' first: of equal objectives, the earlier."""
    import dataclasses
    import io

    from pipelines.progress import Progress

    space = load_search_space(QUICKSTART)
    space = dataclasses.replace(space, objective=dataclasses.replace(space.objective, mode=mode))
    out = io.StringIO()
    progress = Progress(space, "search", out)
    for trial in (1, 2):
        rec = {"name": f"trial {trial:02d}", "trial": trial, "run": None, "evals": 1}
        progress.evaluated(rec, {"step": 10, "objective": 0.5})
    first, second = out.getvalue().splitlines()
    assert first.endswith("| best 0.5000 (trial 01)")
    assert second.endswith("| best 0.5000 (trial 01)")
    assert progress.best == {"objective": 0.5, "trial": 1}


def test_a_resumed_search_s_best_so_far_and_trials_to_go_count_its_earlier_trials():
    """After a resume the progress line's best is the earlier trials' best until a new trial
    beats it, and "to go" counts the search's trials once, not the budget again."""
    import io

    from pipelines.progress import Progress

    space = load_search_space(QUICKSTART)  # objective: max
    out = io.StringIO()
    progress = Progress(space, "search", out, total=4)
    earlier = [
        {"trial": 1, "run": None, "last": {"objective": 0.4}, "status": "completed"},
        {"trial": 2, "run": None, "last": {"objective": 0.7}, "status": "completed"},
        {"trial": 3, "run": None, "last": {}, "status": "running"},  # not yet evaluated
    ]
    progress.adopt_best(earlier)
    assert progress.best == {"objective": 0.7, "trial": 2}
    new = {"name": "trial 04", "trial": 4, "run": None, "evals": 1}
    progress.evaluated(new, {"objective": 0.5})
    assert out.getvalue().rstrip().endswith("| best 0.7000 (trial 02)")
    assert progress.counts({r["trial"]: r for r in earlier}).endswith("to go 1]")
