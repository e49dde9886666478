"""Validation of space files: the first problem becomes one `SpaceError` line naming the file,
the key path and the line, e.g.
``search_spaces/x.yaml: search.top_k.low: 9 is above every num_experts value (max 8) (line 14)``.

`load_search_space` finds a file (a path, or the name of a shipped space), validates it against
graphlora's config dataclasses (imported when called) and builds them once, before Ray starts;
`load_space`/`validate_space` take the allowed names from the caller. `preflight` checks what the
space names (its model, its dataset) before a search starts.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import Checker, SpaceError, parse_yaml
from pipelines.schema import (
    PARAM_KEYS,
    PARAM_TYPES,
    PIPELINE_TRAINING_KEYS,
    SECTIONS,
    TOP_LEVEL,
    Asha,
    Budget,
    Objective,
    Param,
    Resources,
    SearchSpace,
    Stability,
    field_names,
)


def _check_param(c: Checker, name: str, spec: Any, target: str) -> Param:
    kp = f"search.{name}"
    spec = c.mapping(kp, spec)
    for key in spec:
        if key not in PARAM_KEYS:
            raise c.unknown(f"{kp}.{key}", key, PARAM_KEYS)
    if "type" not in spec:
        raise c.error(kp, f"missing 'type' (one of {', '.join(PARAM_TYPES)})")
    ptype = spec["type"]
    if ptype not in PARAM_TYPES:
        raise c.error(f"{kp}.type", f"{ptype!r} is not one of {', '.join(PARAM_TYPES)}")
    if ptype == "categorical":
        for key in ("low", "high", "step"):
            if key in spec:
                raise c.error(f"{kp}.{key}", "not used by a categorical; list 'values' instead")
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise c.error(f"{kp}.values", "expected a non-empty list of values")
        for v in values:
            if not isinstance(v, str | int | float | bool) or v is None:
                raise c.error(f"{kp}.values", f"{v!r}: values must be strings or numbers")
        if len(set(values)) != len(values):
            raise c.error(f"{kp}.values", "duplicate values")
        return Param(name, ptype, target, values=tuple(values))
    if "values" in spec:
        raise c.error(f"{kp}.values", f"not used by type {ptype}; use low/high (or categorical)")
    kind = "int" if ptype == "int" else "number"
    for key in ("low", "high"):
        if key not in spec:
            raise c.error(kp, f"missing '{key}'")
        c.value(f"{kp}.{key}", spec[key], kind)
    low, high = spec["low"], spec["high"]
    if low >= high:
        raise c.error(f"{kp}.low", f"{low} must be below high ({high})")
    if ptype == "loguniform" and low <= 0:
        raise c.error(f"{kp}.low", f"{low}: a loguniform range must be above 0")
    step = spec.get("step")
    if step is not None:
        if ptype == "loguniform":
            raise c.error(f"{kp}.step", "a loguniform range takes no step")
        c.value(f"{kp}.step", step, kind)
        if step <= 0 or step > high - low:
            raise c.error(f"{kp}.step", f"{step} must be in (0, high - low = {high - low}]")
    return Param(name, ptype, target, low=low, high=high, step=step)


def _check_top_k(c: Checker, search: dict[str, Param], adapter: dict[str, Any]) -> None:
    """top_k must never exceed num_experts, whichever of the two is searched: no sampled pair
    may break the adapter config's rule (the config itself judges a fixed pair)."""
    top_k, experts = search.get("top_k"), search.get("num_experts")
    fixed_k, fixed_n = adapter.get("top_k"), adapter.get("num_experts")
    if top_k is not None and experts is not None:
        if top_k.type != "int":
            raise c.error(
                "search.top_k.type",
                "must be 'int' when num_experts is searched too "
                "(its upper bound follows the sampled num_experts)",
            )
        if top_k.low > experts.bounds()[0]:
            raise c.error(
                "search.top_k.low",
                f"{top_k.low} is above the smallest num_experts "
                f"({experts.bounds()[0]}): some trials would have no valid top_k",
            )
    elif top_k is not None and isinstance(fixed_n, int):
        if top_k.bounds()[0] > fixed_n:
            raise c.error(
                "search.top_k.low", f"{top_k.bounds()[0]} is above adapter.num_experts ({fixed_n})"
            )
        if top_k.type == "categorical" and top_k.bounds()[1] > fixed_n:
            raise c.error(
                "search.top_k.values",
                f"{top_k.bounds()[1]} is above adapter.num_experts ({fixed_n})",
            )
    elif experts is not None and isinstance(fixed_k, int):
        if experts.bounds()[0] < fixed_k:
            key = "values" if experts.type == "categorical" else "low"
            raise c.error(
                f"search.num_experts.{key}",
                f"{experts.bounds()[0]} is below adapter.top_k ({fixed_k})",
            )
    # Both fixed: MoELoRAConfig's own rule decides (`check_constructible`).


def validate_space(
    raw: Any,
    path: str,
    *,
    adapter_fields: Collection[str],
    training_fields: Collection[str],
    methods: Collection[str] | None = None,
    root_node: yaml.Node | None = None,
    packed_shared: Collection[str] = (),
) -> SearchSpace:
    """Check a parsed space file and return it as a `SearchSpace`.

    Args:
        raw: The parsed YAML.
        path: File name used in error messages.
        adapter_fields: Names allowed under `adapter:` (and in `search:`), e.g.
            `field_names(MoELoRAConfig) - {"method"}`.
        training_fields: Names allowed under `training:` (and in `search:`).
        methods: Known method names, to check `method` values; None skips the check.
        packed_shared: Training fields the runs packed on one trial host share (cannot be
            searched with `resources.trials_per_host`).
        root_node: The YAML node tree, for line numbers in errors.

    Raises:
        SpaceError: On the first problem found.
    """
    c = Checker(path, root_node)
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise c.unknown(str(key), str(key), TOP_LEVEL)
    for key in ("model", "dataset", "search", "budget"):
        if key not in raw:
            raise SpaceError(f"{path}: {key}: missing required key")
    model = c.value("model", raw["model"], "str")
    dataset = c.value("dataset", raw["dataset"], "str")
    data_dir = raw.get("data_dir")
    if data_dir is not None:
        c.value("data_dir", data_dir, "str")
    seed = c.value("seed", raw.get("seed", 0), "int")
    seeds_per_trial = c.value("seeds_per_trial", raw.get("seeds_per_trial", 1), "int")
    if seeds_per_trial < 1:
        raise c.error("seeds_per_trial", f"{seeds_per_trial} must be at least 1")
    optuna_storage = raw.get("optuna_storage")
    if optuna_storage is not None:
        c.value("optuna_storage", optuna_storage, "str")

    adapter_allowed = set(adapter_fields) - {"method"}
    training_allowed = set(training_fields) - set(PIPELINE_TRAINING_KEYS)
    fixed: dict[str, dict[str, Any]] = {}
    for section, allowed in (("adapter", adapter_allowed), ("training", training_allowed)):
        values = raw.get(section) or {}
        c.mapping(section, values)
        for key in values:
            if key in PIPELINE_TRAINING_KEYS:
                raise c.error(
                    f"{section}.{key}", f"set by the pipeline; use {PIPELINE_TRAINING_KEYS[key]}"
                )
            if key == "method":
                raise c.error(f"{section}.{key}", "use the top-level 'method' (or search.method)")
            if key not in allowed:
                raise c.unknown(f"{section}.{key}", key, allowed)
        fixed[section] = dict(values)

    search_raw = c.mapping("search", raw["search"] or {})
    search: dict[str, Param] = {}
    for name, spec in search_raw.items():
        if name in PIPELINE_TRAINING_KEYS:
            raise c.error(
                f"search.{name}", f"set by the pipeline; use {PIPELINE_TRAINING_KEYS[name]}"
            )
        if name == "method":
            target = "method"
        elif name in adapter_allowed:
            target = "adapter"
        elif name in training_allowed:
            target = "training"
        else:
            raise c.unknown(f"search.{name}", name, adapter_allowed | training_allowed | {"method"})
        if name in fixed["adapter"] or name in fixed["training"]:
            section = "adapter" if name in fixed["adapter"] else "training"
            raise c.error(f"search.{name}", f"also fixed in {section}.{name}; keep one of the two")
        search[name] = _check_param(c, name, spec, target)
    if not search:
        raise c.error("search", "no parameters to search")

    method = raw.get("method")
    if "method" in search:
        if method is not None:
            raise c.error("method", "also searched in search.method; keep one of the two")
        if search["method"].type != "categorical":
            raise c.error("search.method.type", "method can only be categorical")
        names, where = search["method"].values, "search.method.values"
    else:
        if method is None:
            raise SpaceError(f"{path}: method: missing (or search it under search.method)")
        names, where = (c.value("method", method, "str"),), "method"
    if methods is not None:
        for name in names:
            if name not in methods:
                raise c.unknown(where, str(name), methods, what="method")
    _check_top_k(c, search, fixed["adapter"])

    s = {name: c.section(name, raw.get(name)) for name in SECTIONS}
    budget = Budget(**s["budget"])
    for key in ("trials", "max_steps", "eval_every"):
        if getattr(budget, key) < 1:
            raise c.error(f"budget.{key}", f"{getattr(budget, key)} must be at least 1")
    if budget.eval_every > budget.max_steps:
        raise c.error(
            "budget.eval_every",
            f"{budget.eval_every} is above budget.max_steps "
            f"({budget.max_steps}): no evaluation would happen before the end",
        )
    asha = Asha(**s["asha"])
    if not 1 <= asha.grace_period <= budget.max_evals:
        raise c.error(
            "asha.grace_period",
            f"{asha.grace_period} must be in [1, "
            f"{budget.max_evals}] evaluations (max_steps / eval_every)",
        )
    if asha.reduction_factor <= 1:
        raise c.error("asha.reduction_factor", f"{asha.reduction_factor} must be above 1")
    resources = Resources(**s["resources"])
    for key in ("workers_per_trial", "cpus_per_worker", "max_concurrent_trials"):
        if getattr(resources, key) <= 0:
            raise c.error(f"resources.{key}", f"{getattr(resources, key)} must be above 0")
    if resources.gpus_per_worker < 0:
        raise c.error("resources.gpus_per_worker", "must be 0 or more")
    if resources.gpu_memory_gb < 0:
        raise c.error("resources.gpu_memory_gb", "must be 0 (unknown) or more")
    if resources.worker_retries < 0:
        raise c.error("resources.worker_retries", "must be 0 (no restarts) or more")
    for key in ("trials_per_host", "hosts"):
        if getattr(resources, key) < 0:
            raise c.error(f"resources.{key}", f"{getattr(resources, key)} must be 0 or more")
    if resources.on_hosts:
        shared = sorted(set(search) & set(packed_shared))
        if shared:
            raise c.error(
                f"search.{shared[0]}",
                f"the runs packed on one trial host share {shared[0]}, so it cannot be searched "
                "with resources.trials_per_host; fix it under training:, or set "
                "trials_per_host: 0",
            )
    stability = Stability(**s["stability"])
    if stability.top_k_configs < 0:
        raise c.error("stability.top_k_configs", "must be 0 (off) or more")
    if stability.seeds < 1:
        raise c.error("stability.seeds", "must be at least 1")
    objective = Objective(**s["objective"])
    if objective.std_penalty < 0:
        raise c.error("objective.std_penalty", "must be 0 or more")
    experiment = s["mlflow"]["experiment"] or f"graphlora-{Path(path).stem}"

    return SearchSpace(
        path=path,
        model=model,
        dataset=dataset,
        method=method,
        budget=budget,
        search=search,
        data_dir=data_dir,
        seed=seed,
        adapter=fixed["adapter"],
        training=fixed["training"],
        asha=asha,
        resources=resources,
        seeds_per_trial=seeds_per_trial,
        stability=stability,
        objective=objective,
        experiment=experiment,
        optuna_storage=optuna_storage,
        raw=raw,
    )


def load_space(
    path: str | Path,
    *,
    adapter_fields: Collection[str],
    training_fields: Collection[str],
    methods: Collection[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    packed_shared: Collection[str] = (),
) -> SearchSpace:
    """Read and validate a space file (see `validate_space` for the arguments).

    `overrides` (section -> key -> value, e.g. `{"budget": {"trials": 2}}` for a smoke test)
    replace entries of the file's sections before validation, so the result is checked whole.

    Raises:
        SpaceError: Unreadable file, malformed YAML, or any schema problem.
    """
    name = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpaceError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    raw, root_node = parse_yaml(text, name)
    for section, values in (overrides or {}).items():
        if values and isinstance(raw, dict) and isinstance(raw.get(section, {}), dict):
            raw[section] = {**raw.get(section, {}), **values}
    return validate_space(
        raw,
        name,
        adapter_fields=adapter_fields,
        training_fields=training_fields,
        methods=methods,
        root_node=root_node,
        packed_shared=packed_shared,
    )


def check_constructible(space: SearchSpace, train_cls: type, adapter_cls: type) -> None:
    """Build the config dataclasses from the fixed fields (once per method choice), so that
    their own `__post_init__` checks (e.g. plain LoRA needs exactly one expert) fail here,
    before Ray starts, instead of in every trial.

    Raises:
        SpaceError: A dataclass rejected the fixed fields (at the field's line when the file
            sets it).
    """
    try:
        root_node = yaml.compose(Path(space.path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        root_node = None  # no line numbers then
    c = Checker(space.path, root_node)
    adapter, training = space.configs({}, space.seed)
    methods = space.search["method"].values if "method" in space.search else (space.method,)
    for method in methods:
        try:
            adapter_cls(**{**adapter, "method": method})
        except (TypeError, ValueError) as exc:
            where = f" with method {method!r} (from search.method)" if len(methods) > 1 else ""
            raise c.rejected("adapter", adapter_cls, exc, space.adapter, where) from exc
    try:
        train_cls(**training)
    except (TypeError, ValueError) as exc:
        raise c.rejected("training", train_cls, exc, space.training) from exc


# The shipped spaces: `search_spaces/` beside `pipelines/` in a checkout (and an editable
# install); `pipelines/search_spaces/` once installed from a wheel (pyproject.toml maps it there).
SHIPPED_SPACES = (
    Path(__file__).resolve().parent / "search_spaces",
    Path(__file__).resolve().parents[1] / "search_spaces",
)
DEFAULT_SPACE = "quickstart"


def shipped_spaces() -> dict[str, Path]:
    """The spaces that come with graphlora, by name (`quickstart` -> its YAML file)."""
    for folder in SHIPPED_SPACES:
        if folder.is_dir():
            return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    return {}


def resolve_space(space: str | Path) -> Path:
    """A space file: `space` itself when it is a file, else the shipped space it names (a bare
    name such as `quickstart` or `quickstart.yaml`), whatever the working directory.

    Raises:
        SpaceError: neither exists; the message lists the shipped names.
    """
    path = Path(space).expanduser()
    if path.is_file():
        return path
    shipped = shipped_spaces()
    if path.parent == Path(".") and path.name.removesuffix(".yaml") in shipped:
        return shipped[path.name.removesuffix(".yaml")]
    names = ", ".join(shipped) or "none found"
    raise SpaceError(
        f"{space}: no such file, nor a shipped space of that name (shipped: {names}); give a "
        "path to a space YAML or one of those names"
    )


def load_search_space(
    path: str | Path,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> SearchSpace:
    """Load and validate a space file against graphlora's config dataclasses (`overrides`:
    section -> key -> value, replacing the file's entries before validation)."""
    from graphlora.config import METHOD_PRESETS, MoELoRAConfig
    from graphlora.packed_train import SHARED_FIELDS
    from graphlora.run import TrainConfig

    path = resolve_space(path)
    space = load_space(
        path,
        adapter_fields=field_names(MoELoRAConfig),
        training_fields=field_names(TrainConfig),
        methods=METHOD_PRESETS,
        overrides=overrides,
        packed_shared=SHARED_FIELDS,
    )
    check_constructible(space, TrainConfig, MoELoRAConfig)
    return space


def preflight(space: SearchSpace) -> None:
    """What every trial would otherwise fail on: the model reference and the dataset (and, with
    trial hosts, a model that cannot be packed; on GPUs, a largest trial that does not fit).

    Raises:
        SpaceError: one line naming the file and key.
    """
    from graphlora.data import load_task
    from graphlora.models import ModelLoadError, check_model_reference
    from pipelines.memory_check import check_memory

    try:
        check_model_reference(space.model, revision=space.training.get("model_revision"))
    except ModelLoadError as exc:
        raise SpaceError(f"{space.path}: model: {exc}") from None
    try:
        data = load_task(space.dataset, data_dir=space.data_dir)
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        raise SpaceError(f"{space.path}: dataset: {exc}") from None
    if not data.train or not data.validation:
        raise SpaceError(f"{space.path}: dataset: {space.dataset} has no train or validation data")
    if space.resources.on_hosts:
        from graphlora.packed_train import packing_problem

        problem = packing_problem(space.model, revision=space.training.get("model_revision"))
        if problem:
            raise SpaceError(
                f"{space.path}: resources.trials_per_host: {problem}, or set trials_per_host: 0"
            )
    check_memory(space, sys.stdout)  # a GPU space: its largest trial's memory plan
