"""Search-space files: every bad input gives one clear line; shipped spaces validate; the
define-by-run space never proposes top_k above num_experts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from pipelines.errors import SpaceError
from pipelines.schema import field_names
from pipelines.search import load_search_space
from pipelines.tuning import DefineByRun
from pipelines.validate import check_constructible, load_space

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))

GOOD = """\
model: tiny-qwen2
dataset: synthetic
method: graphlora
adapter: {gcn_hidden: 32}
training: {batch_size: 8}
search:
  learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-1}
  num_experts: {type: categorical, values: [4, 8]}
  top_k: {type: int, low: 1, high: 4}
budget: {trials: 4, max_steps: 100, eval_every: 25}
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_search_space(path)


def mutate(**changes) -> str:
    """GOOD with top-level keys replaced (None deletes the key)."""
    doc = yaml.safe_load(GOOD)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return yaml.safe_dump(doc, sort_keys=False)


def test_good_space_loads_with_defaults(tmp_path):
    space = load(tmp_path, GOOD)
    assert space.budget.max_evals == 4
    assert space.seeds_per_trial == 1 and space.stability.seeds == 5
    assert space.objective.metric == "val_accuracy" and space.objective.mode == "max"
    assert space.experiment == "graphlora-space"
    adapter, training = space.configs({"learning_rate": 0.01, "num_experts": 8, "top_k": 2}, 7)
    assert adapter == {"method": "graphlora", "gcn_hidden": 32, "num_experts": 8, "top_k": 2}
    assert training == {
        "model": "tiny-qwen2",
        "dataset": "synthetic",
        "batch_size": 8,
        "max_steps": 100,
        "eval_every": 25,
        "seed": 7,
        "learning_rate": 0.01,
    }


SEARCH = yaml.safe_load(GOOD)["search"]
BAD = [
    # (yaml text, key path expected in the message, words expected in the message)
    ("model: [unclosed\n", "line 2, column 1", "malformed YAML"),
    (mutate(budjet={"trials": 1}), "budjet", "did you mean 'budget'"),
    (
        mutate(search={**SEARCH, "num_expert": {"type": "int", "low": 1, "high": 4}}),
        "search.num_expert",
        "did you mean 'num_experts'",
    ),
    (mutate(adapter={"rnak": 2}), "adapter.rnak", "did you mean 'rank'"),
    (
        mutate(budget={"trials": "eight", "max_steps": 100, "eval_every": 25}),
        "budget.trials",
        "expected an integer",
    ),
    (
        mutate(budget={"trials": True, "max_steps": 100, "eval_every": 25}),
        "budget.trials",
        "expected an integer",
    ),
    (mutate(budget={"trials": 4, "max_steps": 100}), "budget", "missing required key 'eval_every'"),
    (GOOD.replace("low: 1.0e-5", "low: 1e-5"), "search.learning_rate.low", "1.0e-5"),
    (
        mutate(search={**SEARCH, "dropout": {"type": "float", "low": 0.3, "high": 0.1}}),
        "search.dropout.low",
        "must be below high",
    ),
    (
        mutate(search={**SEARCH, "learning_rate": {"type": "loguniform", "low": 0, "high": 1}}),
        "search.learning_rate.low",
        "above 0",
    ),
    (
        mutate(search={**SEARCH, "rank": {"type": "categorical", "values": []}}),
        "search.rank.values",
        "non-empty list",
    ),
    (
        mutate(search={**SEARCH, "rank": {"type": "choice", "values": [1]}}),
        "search.rank.type",
        "not one of",
    ),
    (
        mutate(search={**SEARCH, "top_k": {"type": "int", "low": 9, "high": 12}}),
        "search.top_k.low",
        "above the smallest num_experts",
    ),
    (
        mutate(search={**SEARCH, "top_k": {"type": "categorical", "values": [1, 2]}}),
        "search.top_k.type",
        "must be 'int'",
    ),
    (
        mutate(
            adapter={"num_experts": 4, "top_k": 6},
            search={"learning_rate": SEARCH["learning_rate"]},
        ),
        "adapter.top_k",
        "rejected by MoELoRAConfig: must not exceed the number of experts (4)",
    ),
    (
        mutate(adapter={"top_k": 6}, search={k: v for k, v in SEARCH.items() if k != "top_k"}),
        "search.num_experts.values",
        "below adapter.top_k",
    ),
    (mutate(adapter={"num_experts": 4}), "search.num_experts", "also fixed in adapter"),
    (mutate(training={"max_steps": 5}), "training.max_steps", "budget.max_steps"),
    (mutate(method="graphlora-xl"), "method", "unknown method 'graphlora-xl'"),
    (mutate(method=None), "method", "missing"),
    (
        mutate(budget={"trials": 4, "max_steps": 100, "eval_every": 200}),
        "budget.eval_every",
        "above budget.max_steps",
    ),
    (mutate(asha={"grace_period": 9}), "asha.grace_period", "[1, 4]"),
    (mutate(asha={"reduction_factor": 1}), "asha.reduction_factor", "above 1"),
    (mutate(objective={"mode": "maximise"}), "objective.mode", "'max' or 'min'"),
    (mutate(resources={"workers_per_trial": 0}), "resources.workers_per_trial", "above 0"),
    (mutate(stability={"seeds": 0}), "stability.seeds", "at least 1"),
    (mutate(resources={"trials_per_host": -1}), "resources.trials_per_host", "0 or more"),
    (
        mutate(
            resources={"trials_per_host": 2},
            search={**SEARCH, "max_length": {"type": "categorical", "values": [64, 128]}},
        ),
        "search.max_length",
        "packed on one trial host share max_length",
    ),
    (mutate(search={}), "search", "no parameters"),
    (
        mutate(objective={"secondary": {"metric": "trainable_params", "mode": "smallest"}}),
        "objective.secondary.mode",
        "'max' or 'min'",
    ),
    (
        mutate(objective={"secondary": {"metric": "trainable_params", "direction": "min"}}),
        "objective.secondary.direction",
        "unknown",
    ),
]


@pytest.mark.parametrize(("text", "keypath", "words"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_space_gives_one_clear_line(tmp_path, text, keypath, words):
    with pytest.raises(SpaceError) as err:
        load(tmp_path, text)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'space.yaml'}: ")
    assert keypath in message and words in message, message


def test_error_names_the_line(tmp_path):
    text = GOOD.replace(
        "top_k: {type: int, low: 1, high: 4}", "top_k: {type: int, low: 9, high: 12}"
    )
    with pytest.raises(SpaceError, match=r"search\.top_k\.low: .* \(line 9\)$"):
        load(tmp_path, text)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_spaces_validate(path):
    space = load_search_space(path)
    assert space.search


@dataclasses.dataclass
class _Adapter:
    method: str = "graphlora"
    num_experts: int = 8

    def __post_init__(self) -> None:
        if self.method == "lora" and self.num_experts != 1:
            raise ValueError(
                f"num_experts: plain LoRA needs exactly 1 expert (got {self.num_experts})"
            )


@dataclasses.dataclass
class _Train:
    learning_rate: float = 1e-3


def test_dataclass_checks_run_before_ray(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        mutate(
            method=None,
            adapter={"num_experts": 8},
            training={},
            search={
                "method": {"type": "categorical", "values": ["graphlora", "lora"]},
                "learning_rate": SEARCH["learning_rate"],
            },
        )
    )
    fields = {"adapter_fields": field_names(_Adapter), "training_fields": field_names(_Train)}
    space = load_space(path, **fields)
    with pytest.raises(
        SpaceError,
        match=r"adapter\.num_experts: rejected by _Adapter with method 'lora' .*"
        r"exactly 1 expert .*\(line 4\)",
    ):
        check_constructible(space, _Train, _Adapter)


def test_shipped_spaces_are_the_documented_ones():
    assert {p.name for p in SHIPPED} >= {"quickstart.yaml", "paper.yaml", "compare.yaml"}
    paper = load_search_space(ROOT / "search_spaces/paper.yaml")
    assert paper.search["num_experts"].values == (4, 8, 12, 16, 32)
    assert paper.search["rank"].values == (1, 2, 4, 8, 16, 32)
    assert paper.search["edge_density"].values == (0.1, 0.2, 0.4, 0.6, 0.8)
    assert (paper.search["top_k"].low, paper.search["top_k"].high) == (1, 5)
    assert paper.search["learning_rate"].type == "loguniform"
    assert paper.stability.seeds == 5 and paper.resources.gpus_per_worker >= 1
    compare = load_search_space(ROOT / "search_spaces/compare.yaml")
    assert len(compare.search["method"].values) == 9


# What the platform promises to explore for GraphLoRA (the coordination losses as two coefficients).
GRAPHLORA_KNOBS = {
    "num_experts",
    "top_k",
    "rank",
    "edge_density",
    "poisson_coef",
    "normal_coef",
    "learning_rate",
}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_each_graphlora_space_searches_all_six(path):
    """Experts, top-k, rank, edge density, loss coefficients and learning rate, in every shipped
    space that fixes the method to GraphLoRA (a method comparison keeps each preset's shape)."""
    space = load_search_space(path)
    if space.method != "graphlora":
        assert "method" in space.search, f"{path.name}: no method and no method search"
        return
    assert GRAPHLORA_KNOBS <= set(space.search), GRAPHLORA_KNOBS - set(space.search)
    for coef in ("poisson_coef", "normal_coef"):  # around the paper's 0.005 and 8, log scale
        assert space.search[coef].type == "loguniform"
    assert space.search["poisson_coef"].low < 0.005 < space.search["poisson_coef"].high
    # up to a tenth of the balance weight or more, where the router separates tokens
    assert space.search["poisson_coef"].high >= 0.5
    assert space.search["normal_coef"].low < 8 < space.search["normal_coef"].high


@pytest.mark.parametrize("name", ["paper.yaml", "quickstart.yaml"])
def test_define_by_run_never_proposes_top_k_above_num_experts(name):
    space = load_search_space(ROOT / "search_spaces" / name)
    define = DefineByRun(space)
    seen_k = set()

    def objective(trial: optuna.Trial) -> float:
        define(trial)
        p = trial.params
        assert 1 <= p["top_k"] <= p["num_experts"], p
        seen_k.add((p["num_experts"], p["top_k"]))
        return p["top_k"] / p["num_experts"]  # anything; TPE needs a signal

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=150)
    assert len(study.trials) == 150
    assert any(k == n for n, k in seen_k if n <= 5)  # the clamp is reached, not just avoided


def test_cli_rejects_a_bad_space_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(mutate(search={**SEARCH, "top_k": {"type": "int", "low": 9, "high": 12}}))
    for script in ("pipelines/space.py", "pipelines/search.py"):
        args = [str(bad)] if script.endswith("space.py") else ["--space", str(bad)]
        proc = subprocess.run(
            [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "search.top_k.low" in lines[0], proc.stderr
        assert "Started a local Ray instance" not in proc.stderr


def test_secondary_objective_makes_a_multi_objective_study_whose_plots_draw(tmp_path):
    """`objective.secondary` -> Optuna optimises both; each Optuna plot still draws."""
    from pipelines.tracking import save_optuna_plots
    from pipelines.trial import optuna_objectives

    secondary = {"metric": "trainable_params", "mode": "min"}
    space = load(tmp_path, mutate(objective={"metric": "val_accuracy", "secondary": secondary}))
    assert space.objective.secondary == secondary
    assert optuna_objectives(space) == (["objective", "trainable_params"], ["max", "min"])
    assert optuna_objectives(load(tmp_path, GOOD)) == (["objective"], ["max"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    suggest = DefineByRun(space)
    for i in range(6):
        trial = study.ask()
        suggest(trial)
        study.tell(trial, [0.1 * i, 1000.0 * (i % 3 + 1)])
    written, skipped = save_optuna_plots(study, tmp_path / "plots")
    assert skipped == [] and len(written) == 3


CPU2 = [{"CPU": 2.0}]  # this machine's local Ray
GPU_NODES = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]


@pytest.mark.parametrize(
    ("resources", "nodes", "hosts", "concurrent"),
    [
        ({}, CPU2, 0, 1),  # no hosts: max_concurrent_trials (default 1)
        ({"max_concurrent_trials": 3}, CPU2, 0, 3),
        ({"trials_per_host": 2}, CPU2, 1, 2),  # one host of 2 slots takes both CPUs
        ({"trials_per_host": 1}, [{"CPU": 1.0}, {"CPU": 1.0}], 2, 2),  # one per node
        ({"trials_per_host": 2}, [{"CPU": 1.0}, {"CPU": 1.0}], 0, 1),  # no node holds one
        ({"trials_per_host": 2, "max_concurrent_trials": 1}, CPU2, 1, 1),  # the space caps it
        ({"trials_per_host": 4, "gpus_per_worker": 1}, GPU_NODES, 1, 4),  # 4 trials: 1 host
        ({"trials_per_host": 1, "gpus_per_worker": 1}, GPU_NODES, 4, 4),  # one per trial
        ({"trials_per_host": 2, "gpus_per_worker": 1, "hosts": 3}, GPU_NODES, 3, 6),
        # Hosts of 2 data-parallel workers: one per 2 GPUs, wherever the workers land.
        ({"trials_per_host": 1, "gpus_per_worker": 1, "workers_per_trial": 2}, GPU_NODES, 4, 4),
        (
            {"trials_per_host": 1, "gpus_per_worker": 1, "workers_per_trial": 3},
            [{"CPU": 8.0, "GPU": 2.0}] * 3,
            2,
            2,
        ),
        ({"trials_per_host": 2, "workers_per_trial": 2, "cpus_per_worker": 0.5}, CPU2, 1, 2),
        ({"trials_per_host": 2, "workers_per_trial": 2}, CPU2, 0, 1),  # 2 x 2 CPUs: too big
    ],
)
def test_trial_hosts_and_concurrency_follow_resources(
    tmp_path, resources, nodes, hosts, concurrent
):
    space = load(tmp_path, mutate(resources=resources))  # 4 trials of 1 seed
    res = space.resources
    count = res.host_count(nodes, space.budget.trials) if res.trials_per_host else 0
    assert count == hosts
    explicit = "max_concurrent_trials" in resources
    assert res.concurrent_trials(count, space.seeds_per_trial, explicit) == concurrent
    if res.trials_per_host and not res.gpus_per_worker:  # a CPU host takes its slots' CPUs
        assert res.host_cpus() == res.cpus_per_worker * res.trials_per_host


def test_each_section_lists_every_field_of_its_dataclass_with_its_default():
    """A section's keys and defaults are its dataclass's fields (one place for a default)."""
    from pipelines.schema import SECTIONS, Asha, Budget, Mlflow, Objective, Resources, Stability

    classes = {
        "budget": Budget,
        "asha": Asha,
        "resources": Resources,
        "stability": Stability,
        "objective": Objective,
        "mlflow": Mlflow,
    }
    assert set(SECTIONS) == set(classes)
    for name, cls in classes.items():
        assert set(SECTIONS[name]) == field_names(cls), name
    assert SECTIONS["resources"]["trials_per_host"] == ("int", Resources.trials_per_host)
