"""Will a trial fit its GPU? The memory plan (`graphlora.memory`) of the space's largest trial,
checked before the search starts anything, and `training.gradient_checkpointing: auto`
decided per trial.

The plan needs the model's config only (no weights), so a space whose trials cannot fit is
refused in seconds, with the values that make the largest trial, what it needs, what the GPU
has, and what to change, instead of every trial dying out of memory after the cluster started
and the model loaded. The GPU's memory comes from `resources.gpu_memory_gb`; without it the
plan is printed and nothing is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from pipelines.errors import SpaceError
from pipelines.schema import SearchSpace, top_k_high

GB = 1e9
GIB = 2**30
# Positions a step predicts per row when it trains on answers only: multiple-choice answers
# ("answer2", "true") are a few tokens; the plan's logits are taken at this many.
ANSWER_TOKENS = 8
HEADROOM = 0.9  # of a GPU's memory a step may plan to take (the CUDA context, fragmentation)
# Searched values that make a trial larger (the largest value of each makes the largest trial).
_GROWS = ("num_experts", "top_k", "rank", "gcn_hidden", "gcn_layers", "batch_size", "max_length")


def budget_bytes(space: SearchSpace) -> float | None:
    """Each GPU's memory in bytes (`resources.gpu_memory_gb`), or None when unknown."""
    gb = space.resources.gpu_memory_gb
    return gb * GB if gb > 0 else None


def largest_params(space: SearchSpace) -> dict[str, Any]:
    """The searched values of the space's most memory-hungry trial: the largest of each
    parameter that grows a step's memory (top_k no larger than num_experts), the lowest of the
    others (they do not change memory)."""
    params = {}
    for name, p in space.search.items():
        low, high = p.bounds()
        params[name] = high if name in _GROWS else low
    if "top_k" in params:
        experts = params.get("num_experts", space.adapter.get("num_experts"))
        params["top_k"] = top_k_high(params["top_k"], experts)
    return params


def _shape(space: SearchSpace, training: Mapping[str, Any]) -> tuple[dict, int]:
    """plan_memory's shape arguments for one GPU of a trial, and the trial's slots per GPU."""
    from graphlora.memory import trial_shape
    from graphlora.run import TrainConfig

    res = space.resources
    slots = res.trials_per_host * space.seeds_per_trial if res.on_hosts else 1
    shape = trial_shape(TrainConfig.from_dict(training), adapters=max(1, slots))
    # Data parallel: each of a trial's workers holds its share of the batch.
    shape["batch_size"] = max(1, shape["batch_size"] // max(1, res.workers_per_trial))
    if not training.get("train_on_prompt"):
        shape["labelled_per_row"] = min(ANSWER_TOKENS, shape["max_length"])
    return shape, slots


def resolve_checkpointing(space: SearchSpace, adapter: dict, training: dict) -> None:
    """`gradient_checkpointing: auto` in `training` made true or false for this run, in place:
    on when its plan does not fit the GPU without it (with trial hosts: when the largest trial's
    does not, since a host's slots share one setting); off when it fits, or the GPU's memory is
    unknown, or the run trains on CPUs."""
    if training.get("gradient_checkpointing") != "auto":
        return
    budget = budget_bytes(space) if space.resources.gpus_per_worker > 0 else None
    if budget is None:
        training["gradient_checkpointing"] = False
        return
    if space.resources.on_hosts:
        # A host's slots share one forward and so one setting: the largest trial's decides.
        adapter, training_max = space.configs(largest_params(space), space.seed)
        training["gradient_checkpointing"] = _decide(space, adapter, training_max, budget)
        return
    training["gradient_checkpointing"] = _decide(space, adapter, training, budget)


def _decide(space: SearchSpace, adapter: dict, training: dict, budget: float) -> bool:
    from graphlora.config import MoELoRAConfig
    from graphlora.memory import decide_checkpointing

    shape, _ = _shape(space, {**training, "gradient_checkpointing": False})
    shape.pop("gradient_checkpointing", None)
    adapter_cfg = MoELoRAConfig.from_dict(adapter)
    return decide_checkpointing(
        training["model"], adapter_cfg, budget=budget, headroom=HEADROOM, **shape
    )


def check_memory(space: SearchSpace, out: IO[str]) -> dict[str, Any] | None:
    """Plan the largest trial of a GPU space, print it, and refuse the space when it cannot fit.

    Returns the plan's figures (None for a CPU space: nothing to plan against).

    Raises:
        SpaceError: one line: the values, what the largest trial needs, what the GPU has, and
            what to change.
    """
    if space.resources.gpus_per_worker <= 0:
        return None
    from graphlora.config import MoELoRAConfig
    from graphlora.memory import plan_memory

    params = largest_params(space)
    adapter, training = space.configs(params, space.seed)
    resolve_checkpointing(space, adapter, training)  # as the trial's stage decides it
    auto = space.training.get("gradient_checkpointing") == "auto"
    shape, slots = _shape(space, training)
    shape["gradient_checkpointing"] = training.get("gradient_checkpointing") is True
    plan = plan_memory(training["model"], MoELoRAConfig.from_dict(adapter), **shape)
    budget = budget_bytes(space)
    grown = {k: v for k, v in params.items() if k in _GROWS}
    values = ", ".join(f"{k}={v}" for k, v in grown.items()) or "the fixed values"
    ckpt = "on" if shape["gradient_checkpointing"] else "off"
    head = (
        f"memory plan: the largest trial ({values}; batch {shape['batch_size']} x "
        f"{shape['max_length']} tokens per GPU, {slots} run(s) per GPU, checkpointing {ckpt}"
        f"{' by auto' if auto else ''}) needs {plan.total / GIB:.1f} GiB per GPU"
    )
    if budget is None:
        print(f"{head}; GPU memory unknown: set resources.gpu_memory_gb to check it", file=out)
    else:
        print(f"{head} of {budget / GB:g} GB ({HEADROOM:.0%} usable)", file=out)
        if not plan.fits(budget, HEADROOM):
            fixes = ["a smaller training.batch_size or max_length", "more grad_accum"]
            if not shape["gradient_checkpointing"]:
                fixes.insert(0, "training.gradient_checkpointing: true (or auto)")
            if slots > 1:
                fixes.append("fewer resources.trials_per_host")
            fixes.append("smaller searched ranges, or a larger GPU")
            raise SpaceError(
                f"{space.path}: resources.gpu_memory_gb: the largest trial ({values}) needs "
                f"{plan.total / GIB:.1f} GiB per GPU and {budget / GB:g} GB GPUs hold "
                f"{budget * HEADROOM / GIB:.1f} GiB usable; try " + ", ".join(fixes)
            )
    return {"planned_peak_gib": plan.total / GIB, "gradient_checkpointing": ckpt == "on"}
