"""Search-space files (`search_spaces/*.yaml`): schema, validation, and the Optuna space.

A space file is checked in full before Ray starts; the first problem becomes one error line
naming the file, the key path and the line, e.g.
``search_spaces/x.yaml: search.top_k.low: 9 is above every num_experts value (max 8) (line 14)``.

Schema (every key; `?` marks optional ones, with their default)::

    model: tiny-qwen2               # base model name or path
    dataset: synthetic              # task name
    data_dir?: null                 # local data folder (relative to the working directory)
    method?: graphlora              # required unless `search.method` is searched
    seed?: 0                        # seeds the Optuna sampler; training seeds count up from it
    adapter?: {num_experts: 8}      # fixed adapter fields (graphlora MoELoRAConfig)
    training?: {batch_size: 8}      # fixed training fields (graphlora TrainConfig)
    search:                         # name -> distribution (adapter/training field or `method`)
      learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-1}
      num_experts: {type: categorical, values: [4, 8, 16]}
      top_k: {type: int, low: 1, high: 4}         # never above the sampled num_experts
      dropout: {type: float, low: 0.0, high: 0.2, step?: 0.05}
    budget: {trials: 8, max_steps: 200, eval_every: 50}
    asha?: {grace_period: 1, reduction_factor: 2}              # grace period in evaluations
    resources?: {workers_per_trial: 1, gpus_per_worker: 0, cpus_per_worker: 1,
                 max_concurrent_trials: 1, worker_retries: 2,   # retries: restarts of a
                                    # trial's Train run from its last checkpoint when a worker dies
                 trials_per_host: 0,  # > 0: trial hosts load the base once and pack this many
                                    # runs per forward (pipelines/host.py); 0: a Train run each
                 hosts: 0}          # how many hosts; 0: as many as the nodes hold (a
                                    # GPU host: workers_per_trial GPU workers, data-parallel;
                                    # a CPU host: its slots' CPUs per worker)
    seeds_per_trial?: 1             # seeds trained side by side per trial; ASHA/Optuna see the mean
    stability?: {top_k_configs: 0, seeds: 5}    # re-run the best configs with fresh seeds
    objective?: {metric: val_accuracy, mode: max, std_penalty: 0.0,   # mean -/+ penalty * std
                 secondary?: {metric: trainable_params, mode: min}}  # Optuna: Pareto front
    mlflow?: {experiment: <file stem>}
    optuna_storage?: postgresql://USER@HOST:5432/DB  # the Optuna study in a shared database
                                    # (default: optuna.db in the results folder; see storage.py)

Allowed `adapter:`/`training:`/`search:` names come from the training library's dataclasses
(`field_names(SomeDataclass)`). `load_search_space` validates against the graphlora library's
(imported when called); `load_space` takes the names from the caller.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAM_TYPES = ("int", "float", "loguniform", "categorical")
# Set by the pipeline itself, never by `training:` or `search:`.
PIPELINE_TRAINING_KEYS = {
    "model": "model",
    "dataset": "dataset",
    "data_dir": "data_dir",
    "max_steps": "budget.max_steps",
    "eval_every": "budget.eval_every",
    "seed": "seed / seeds_per_trial / stability.seeds",
}
_REQUIRED = object()

# section -> key -> (kind, default); kinds: int, number, str, bool, mode
_SECTIONS: dict[str, dict[str, tuple[str, Any]]] = {
    "budget": {
        "trials": ("int", _REQUIRED),
        "max_steps": ("int", _REQUIRED),
        "eval_every": ("int", _REQUIRED),
    },
    "asha": {"grace_period": ("int", 1), "reduction_factor": ("number", 2)},
    "resources": {
        "workers_per_trial": ("int", 1),
        "gpus_per_worker": ("number", 0),
        "cpus_per_worker": ("number", 1),
        "max_concurrent_trials": ("int", 1),
        "worker_retries": ("int", 2),
        "trials_per_host": ("int", 0),
        "hosts": ("int", 0),
    },
    "stability": {"top_k_configs": ("int", 0), "seeds": ("int", 5)},
    "objective": {
        "metric": ("str", "val_accuracy"),
        "mode": ("mode", "max"),
        "std_penalty": ("number", 0.0),
        "secondary": ("secondary", None),
    },
    "mlflow": {"experiment": ("str", None)},
}
_TOP_LEVEL = {
    "model",
    "dataset",
    "data_dir",
    "method",
    "seed",
    "adapter",
    "training",
    "search",
    "seeds_per_trial",
    "optuna_storage",
    *_SECTIONS,
}
_PARAM_KEYS = {"type", "low", "high", "values", "step"}


class SpaceError(ValueError):
    """A search-space file is wrong; the message is one line: `file: key.path: what (line N)`."""


def field_names(cls: type) -> frozenset[str]:
    """Field names of a dataclass, e.g. `field_names(MoELoRAConfig)` for `adapter_fields`."""
    return frozenset(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class Param:
    """One searched parameter. `target` says which config it lands in: adapter, training, method."""

    name: str
    type: str
    target: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None
    step: float | None = None

    def bounds(self) -> tuple[Any, Any]:
        """Smallest and largest value this parameter can take."""
        if self.type == "categorical":
            return min(self.values), max(self.values)  # type: ignore[type-var]
        return self.low, self.high


@dataclass(frozen=True)
class Budget:
    trials: int
    max_steps: int
    eval_every: int

    @property
    def max_evals(self) -> int:
        """Evaluations in a full run (one Tune report each): ASHA's `max_t`."""
        return math.ceil(self.max_steps / self.eval_every)


@dataclass(frozen=True)
class Asha:
    grace_period: int = 1
    reduction_factor: float = 2


@dataclass(frozen=True)
class Resources:
    workers_per_trial: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    max_concurrent_trials: int = 1
    worker_retries: int = 2  # restarts of a Train run from its last checkpoint when a worker dies
    trials_per_host: int = 0  # > 0: runs packed per trial host (pipelines/host.py); 0: no hosts
    hosts: int = 0  # trial hosts; 0: as many as the cluster's nodes hold (one per GPU worker)

    def host_count(self, nodes: list[dict[str, float]], runs: int) -> int:
        """How many trial hosts a search starts: `hosts` if set, else as many as the cluster's
        nodes (their resources: `ray.nodes()[i]["Resources"]`) hold, one per GPU worker group
        on GPU nodes (`workers_per_trial` workers each), but no more than `runs` (trials x
        seeds) fill; 0 when the nodes do not hold one."""
        if self.hosts:
            return self.hosts
        need = {"CPU": self.host_cpus(), "GPU": self.gpus_per_worker}
        workers = sum(
            min(int(node.get(k, 0.0) // v) for k, v in need.items() if v > 0) for node in nodes
        )
        fit = workers // self.workers_per_trial
        return min(fit, max(1, math.ceil(runs / self.trials_per_host)))

    def host_cpus(self) -> float:
        """CPUs each worker of a host reserves: a CPU host packs `trials_per_host` runs on the
        CPUs as many trials' workers would take; a GPU host packs them on its GPUs and takes one
        worker's CPUs per worker."""
        if self.gpus_per_worker > 0:
            return self.cpus_per_worker
        return self.cpus_per_worker * self.trials_per_host

    def concurrent_trials(self, hosts: int, seeds: int, explicit: bool) -> int:
        """Trials run at once: with hosts, as many as their slots hold (`seeds` slots each),
        unless the space caps it (`explicit`: it sets max_concurrent_trials); else
        max_concurrent_trials."""
        if not self.trials_per_host:
            return self.max_concurrent_trials
        fits = max(1, hosts * self.trials_per_host // seeds)
        return min(fits, self.max_concurrent_trials) if explicit else fits


@dataclass(frozen=True)
class Stability:
    top_k_configs: int = 0
    seeds: int = 5


@dataclass(frozen=True)
class Objective:
    metric: str = "val_accuracy"
    mode: str = "max"
    std_penalty: float = 0.0
    # Optional second objective, e.g. {metric: trainable_params, mode: min}: Optuna then searches
    # the Pareto front of both; ASHA still judges the first, and the best config is still chosen
    # on the first.
    secondary: dict[str, str] | None = None

    def score(self, mean: float, std: float) -> float:
        """Seed mean, penalised by the seed std in the direction that makes it worse."""
        sign = -1.0 if self.mode == "max" else 1.0
        return mean + sign * self.std_penalty * std


@dataclass(frozen=True)
class SearchSpace:
    """A validated space file. `raw` is the parsed YAML, logged as-is to MLflow."""

    path: str
    model: str
    dataset: str
    method: str | None
    budget: Budget
    search: dict[str, Param]
    data_dir: str | None = None
    seed: int = 0
    adapter: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    asha: Asha = Asha()
    resources: Resources = Resources()
    seeds_per_trial: int = 1
    stability: Stability = Stability()
    objective: Objective = Objective()
    experiment: str = "graphlora"
    optuna_storage: str | None = None  # a database URL; None: optuna.db in the results folder
    raw: dict[str, Any] = field(default_factory=dict)

    def configs(self, params: Mapping[str, Any], seed: int) -> tuple[dict, dict]:
        """Adapter and training dicts for one run: fixed fields, then sampled ones, then the seed.

        The adapter dict includes `method`, ready for `MoELoRAConfig(**adapter)`; the training
        dict is ready for `TrainConfig(**training)`.
        """
        adapter = {"method": self.method, **self.adapter}
        training = {
            "model": self.model,
            "dataset": self.dataset,
            **self.training,
            "max_steps": self.budget.max_steps,
            "eval_every": self.budget.eval_every,
            "seed": seed,
        }
        if self.data_dir is not None:
            training["data_dir"] = self.data_dir
        for name, value in params.items():
            target = self.search[name].target
            (training if target == "training" else adapter)[name] = value
        return adapter, training


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Checker:
    """Carries the file name and YAML node tree so every error can say where it is."""

    def __init__(self, path: str, root_node: yaml.Node | None) -> None:
        self.path = path
        self.root_node = root_node

    def error(self, keypath: str, message: str) -> SpaceError:
        line = self._line(keypath)
        where = f" (line {line})" if line else ""
        return SpaceError(f"{self.path}: {keypath}: {message}{where}")

    def _line(self, keypath: str) -> int | None:
        node, line = self.root_node, None
        for part in keypath.split("."):
            if not isinstance(node, yaml.MappingNode):
                break
            for key_node, value_node in node.value:
                if key_node.value == part:
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                break
        return line

    def unknown(
        self, keypath: str, key: str, allowed: Iterable[str], what: str = "key"
    ) -> SpaceError:
        close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(allowed))}"
        unknown = "unknown key" if what == "key" else f"unknown {what} '{key}'"
        return self.error(keypath, f"{unknown}; {hint}")

    def value(self, keypath: str, value: Any, kind: str) -> Any:
        if kind == "secondary":  # {metric: <name>, mode: max|min}
            given = self.mapping(keypath, value)
            for key in given:
                if key not in ("metric", "mode"):
                    raise self.unknown(f"{keypath}.{key}", str(key), {"metric", "mode"})
            return {
                "metric": self.value(f"{keypath}.metric", given.get("metric"), "str"),
                "mode": self.value(f"{keypath}.mode", given.get("mode"), "mode"),
            }
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str) and value != "",
            "bool": isinstance(value, bool),
            "mode": value in ("max", "min"),
        }[kind]
        if not ok:
            if kind in ("int", "number") and isinstance(value, str) and _is_number(value):
                raise self.error(
                    keypath,
                    f"{value!r} is text to YAML; write it with a decimal "
                    "point and a signed exponent, e.g. 1.0e-5",
                )
            want = {
                "int": "an integer",
                "number": "a number",
                "str": "a non-empty string",
                "bool": "true or false",
                "mode": "'max' or 'min'",
            }[kind]
            raise self.error(keypath, f"expected {want}, got {value!r}")
        return value

    def mapping(self, keypath: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise self.error(keypath, f"expected a mapping (key: value lines), got {value!r}")
        return value

    def section(self, name: str, value: Any) -> dict[str, Any]:
        spec = _SECTIONS[name]
        value = {} if value is None else self.mapping(name, value)
        for key in value:
            if key not in spec:
                raise self.unknown(f"{name}.{key}", key, spec)
        out = {}
        for key, (kind, default) in spec.items():
            if key not in value:
                if default is _REQUIRED:
                    raise self.error(name, f"missing required key '{key}'")
                out[key] = default
            else:
                out[key] = self.value(f"{name}.{key}", value[key], kind)
        return out


def _check_param(c: Checker, name: str, spec: Any, target: str) -> Param:
    kp = f"search.{name}"
    spec = c.mapping(kp, spec)
    for key in spec:
        if key not in _PARAM_KEYS:
            raise c.unknown(f"{kp}.{key}", key, _PARAM_KEYS)
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
    """top_k must never exceed num_experts, whichever of the two is fixed or searched."""
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
    elif isinstance(fixed_k, int) and isinstance(fixed_n, int) and fixed_k > fixed_n:
        raise c.error("adapter.top_k", f"{fixed_k} is above adapter.num_experts ({fixed_n})")


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
        if key not in _TOP_LEVEL:
            raise c.unknown(str(key), str(key), _TOP_LEVEL)
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

    s = {name: c.section(name, raw.get(name)) for name in _SECTIONS}
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
    if resources.worker_retries < 0:
        raise c.error("resources.worker_retries", "must be 0 (no restarts) or more")
    for key in ("trials_per_host", "hosts"):
        if getattr(resources, key) < 0:
            raise c.error(f"resources.{key}", f"{getattr(resources, key)} must be 0 or more")
    if resources.trials_per_host:
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


def parse_yaml(text: str, name: str) -> tuple[Any, yaml.Node | None]:
    """The parsed document and its node tree (for line numbers in errors).

    Raises:
        SpaceError: Malformed YAML, with its line and column.
    """
    try:
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpaceError(f"{name}: {where}malformed YAML: {problem}") from exc


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
        SpaceError: A dataclass rejected the fixed fields.
    """
    adapter, training = space.configs({}, space.seed)
    methods = space.search["method"].values if "method" in space.search else (space.method,)
    for method in methods:
        try:
            adapter_cls(**{**adapter, "method": method})
        except (TypeError, ValueError) as exc:
            where = f" with method {method!r} (from search.method)" if len(methods) > 1 else ""
            raise SpaceError(
                f"{space.path}: adapter: rejected by {adapter_cls.__name__}{where}: "
                f"{first_line(exc)}"
            ) from exc
    try:
        train_cls(**training)
    except (TypeError, ValueError) as exc:
        raise SpaceError(
            f"{space.path}: training: rejected by {train_cls.__name__}: {first_line(exc)}"
        ) from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error for a person says."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_line(exc: BaseException) -> str:
    """`Type: first line` of an exception (its type's name alone when it has no message)."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc)}" if str(exc).strip() else name


class DefineByRun:
    """Optuna define-by-run space for `OptunaSearch`: suggests values, computes nothing.

    num_experts is suggested first so top_k's upper bound can follow it
    (top_k in [low, min(high, num_experts)]). Picklable, so Tune can checkpoint the searcher.
    """

    def __init__(self, space: SearchSpace) -> None:
        order = sorted(space.search, key=lambda n: (n != "num_experts", n == "top_k"))
        self.params = [space.search[n] for n in order]
        self.fixed_experts = space.adapter.get("num_experts")

    def __call__(self, trial: Any) -> None:
        experts = self.fixed_experts
        for p in self.params:
            if p.type == "categorical":
                value = trial.suggest_categorical(p.name, list(p.values))
            elif p.type == "int":
                high = p.high
                if p.name == "top_k" and isinstance(experts, int):
                    high = min(high, experts)
                value = trial.suggest_int(p.name, p.low, high, step=p.step or 1)
            else:
                value = trial.suggest_float(
                    p.name, p.low, p.high, step=p.step, log=p.type == "loguniform"
                )
            if p.name == "num_experts":
                experts = value


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


def main(argv: list[str] | None = None) -> int:
    """`graphlora-space [SPACE...]`: validate space files against the training API."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="graphlora-space",
        description="Validate search spaces without starting anything; one error line and exit "
        "status 2 on the first bad one.",
    )
    parser.add_argument(
        "spaces",
        nargs="*",
        metavar="SPACE",
        default=[DEFAULT_SPACE],
        help="a space YAML, or the name of a shipped space "
        f"({', '.join(shipped_spaces())}); default: %(default)s",
    )
    for p in parser.parse_args(argv).spaces:
        try:
            space = load_search_space(p)
        except SpaceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"ok: {p}: {len(space.search)} searched parameters, {space.budget.trials} trials")
    return 0


if __name__ == "__main__":
    from pipelines.space import main as _main  # one SpaceError class, not a __main__ copy

    raise SystemExit(_main())
