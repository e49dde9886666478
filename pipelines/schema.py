"""The search-space schema: what a space file (`search_spaces/*.yaml`) holds, as dataclasses.

Data only: `pipelines/validate.py` checks a parsed file and builds a `SearchSpace`, and every
layer of the search reads it. This module imports nothing else of `pipelines`.

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
                 hosts: 0,          # how many hosts; 0: as many as the nodes hold (a
                                    # GPU host: workers_per_trial GPU workers, data-parallel;
                                    # a CPU host: its slots' CPUs per worker)
                 gpu_memory_gb: 0}  # each GPU's memory; 0: unknown. Set: the largest trial's
                                    # memory plan must fit (pipelines/memory_check.py), and
                                    # training.gradient_checkpointing: auto decides per trial
    seeds_per_trial?: 1             # seeds trained side by side per trial; ASHA/Optuna see the mean
    stability?: {top_k_configs: 0, seeds: 5}    # re-run the best configs with fresh seeds
    objective?: {metric: val_accuracy, mode: max, std_penalty: 0.0,   # mean -/+ penalty * std
                 secondary?: {metric: trainable_params, mode: min}}  # Optuna: Pareto front
    mlflow?: {experiment: <file stem>}
    optuna_storage?: postgresql://USER@HOST:5432/DB  # the Optuna study in a shared database
                                    # (default: optuna.db in the results folder; see storage.py)

Allowed `adapter:`/`training:`/`search:` names come from the training library's dataclasses
(`field_names(SomeDataclass)`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
REQUIRED = object()

PARAM_KEYS = {"type", "low", "high", "values", "step"}


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


def top_k_high(high: int, experts: Any) -> int:
    """top_k's largest value beside `experts` experts: never above num_experts (`experts` not
    an int: not known yet, `high` stands)."""
    return min(high, experts) if isinstance(experts, int) else high


def how_many_fit(have: Mapping[str, float], need: Mapping[str, float], default: int = 0) -> int:
    """How many of `need` (CPU, GPU) `have` (a node's or a cluster's resources) holds at once;
    `default` when `need` is nothing."""
    return min((int(have.get(k, 0.0) // v) for k, v in need.items() if v > 0), default=default)


@dataclass(frozen=True)
class Resources:
    workers_per_trial: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    max_concurrent_trials: int = 1
    worker_retries: int = 2  # restarts of a Train run from its last checkpoint when a worker dies
    trials_per_host: int = 0  # > 0: runs packed per trial host (pipelines/host.py); 0: no hosts
    hosts: int = 0  # trial hosts; 0: as many as the cluster's nodes hold (one per GPU worker)
    # Memory of each GPU in GB; 0: unknown. Checks the largest trial's memory plan before the
    # search starts, and lets `training.gradient_checkpointing: auto` decide per trial.
    gpu_memory_gb: float = 0

    @property
    def on_hosts(self) -> bool:
        """Whether the search packs its trials on trial hosts (`pipelines/host.py`)."""
        return self.trials_per_host > 0

    def host_count(self, nodes: list[dict[str, float]], runs: int) -> int:
        """How many trial hosts a search starts: `hosts` if set, else as many as the cluster's
        nodes (their resources: `ray.nodes()[i]["Resources"]`) hold, one per GPU worker group
        on GPU nodes (`workers_per_trial` workers each), but no more than `runs` (trials x
        seeds) fill; 0 when the nodes do not hold one."""
        if self.hosts:
            return self.hosts
        need = {"CPU": self.host_cpus(), "GPU": self.gpus_per_worker}
        workers = sum(how_many_fit(node, need) for node in nodes)
        fit = workers // self.workers_per_trial
        return min(fit, max(1, math.ceil(runs / self.trials_per_host)))

    def trial_needs(self, seeds: int) -> dict[str, float]:
        """The CPUs and GPUs a trial of `seeds` seeds takes without trial hosts."""
        runs = self.workers_per_trial * seeds
        return {"CPU": self.cpus_per_worker * runs, "GPU": self.gpus_per_worker * runs}

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
        if not self.on_hosts:
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

        The adapter dict includes `method`, ready for `MoELoRAConfig.from_dict`; the training
        dict for `TrainConfig.from_dict`.
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


@dataclass(frozen=True)
class Mlflow:
    experiment: str | None = None  # None: graphlora-<space file stem>


def _section(cls: type, kinds: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """key -> (kind, default) of one section, the default being its dataclass field's own
    (`REQUIRED` where the field has none), so each default is written once."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {
        key: (kind, REQUIRED if defaults[key] is dataclasses.MISSING else defaults[key])
        for key, kind in kinds.items()
    }


# section -> key -> (kind, default); kinds: int, number, str, bool, mode, secondary
SECTIONS: dict[str, dict[str, tuple[str, Any]]] = {
    "budget": _section(Budget, {"trials": "int", "max_steps": "int", "eval_every": "int"}),
    "asha": _section(Asha, {"grace_period": "int", "reduction_factor": "number"}),
    "resources": _section(
        Resources,
        {
            "workers_per_trial": "int",
            "gpus_per_worker": "number",
            "cpus_per_worker": "number",
            "max_concurrent_trials": "int",
            "worker_retries": "int",
            "trials_per_host": "int",
            "hosts": "int",
            "gpu_memory_gb": "number",
        },
    ),
    "stability": _section(Stability, {"top_k_configs": "int", "seeds": "int"}),
    "objective": _section(
        Objective,
        {"metric": "str", "mode": "mode", "std_penalty": "number", "secondary": "secondary"},
    ),
    "mlflow": _section(Mlflow, {"experiment": "str"}),
}
TOP_LEVEL = {
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
    *SECTIONS,
}
