"""`best_config.yaml`, written and read here: the search writes it at its end
(`write_best_config`); a promotion starts from it, or from the one a finished MLflow search run
holds, validated in full before anything starts.

Errors are one line naming the file (or run), the key and its line, as a space file's are
(`pipelines/errors.py`, whose checker this reuses); a search run that is missing, still
running, failed or without a best configuration is a `PromotionError` saying which and what to do.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import Checker, SpaceError, first_line, parse_yaml
from pipelines.schema import SearchSpace, field_names
from pipelines.tracking import check_store, tracking_uri

BEST_CONFIG = "best_config.yaml"
_TOP_LEVEL = {"source", "objective", "scores", "routing", "adapter", "training"}
# The search's record of the router's health (`pipelines.records.routing_summary`): optional.
_ROUTING_KEYS = {"min_batch_entropy", "collapsed_layers"}
# Training fields the promotion sets itself: a seed in the file is an error (the search writes
# none, and --seeds would silently win); the others are overridden.
_SET_HERE = {"seed", "output_dir", "eval_test"}
_OBJECTIVE_KEYS = {"metric", "mode", "std_penalty"}  # what a best config's objective holds
# TrainConfig field -> the flag that overrides it (to blame the flag, not the file).
_FLAGS = {
    "max_steps": "--max-steps/--epochs",
    "dataset": "--dataset",
    "data_dir": "--data-dir",
    "max_test_examples": "--max-test-examples",
}


def write_best_config(output_dir: Path, space: SearchSpace, best: dict[str, Any]) -> Path:
    """Write a search's `best_config.yaml` into `output_dir` and return its path.

    Args:
        output_dir: the search's results folder.
        space: the search's space (fixed fields, objective, seed).
        best: the chosen configuration (`pipelines.stability.choose_best`): `params` (the
            sampled values), `source` (e.g. "stability config-1 (trial 3)"), `scores` and
            optionally `routing` (`pipelines.records.routing_summary`).
    """
    from graphlora.health import COLLAPSE_ENTROPY

    adapter, training = space.configs(best["params"], space.seed)
    training.pop("seed")  # the promotion's own (--seeds)
    doc = {
        "source": f"{Path(space.path).name}: {best['source']}",
        "objective": {
            "metric": space.objective.metric,
            "mode": space.objective.mode,
            "std_penalty": space.objective.std_penalty,
        },
        "scores": {k: float(v) for k, v in best["scores"].items()},
        **({"routing": best["routing"]} if best.get("routing") else {}),
        "adapter": adapter,
        "training": training,
    }
    comment = (
        "# Best configuration found. Load with MoELoRAConfig(**adapter) and\n"
        "# TrainConfig(**training, seed=...).\n"
    )
    if "routing" in doc:
        comment += (
            "# routing: the router at the last evaluation: min_batch_entropy, the lowest "
            "per-batch\n# routing entropy of any layer (0-1); collapsed_layers, the layers below "
            f"{COLLAPSE_ENTROPY:g}.\n"
        )
    path = output_dir / BEST_CONFIG
    path.write_text(comment + yaml.safe_dump(doc, sort_keys=False))
    return path


class PromotionError(ValueError):
    """The promotion cannot start; the message is one line saying what is wrong and what to do."""


@dataclass
class BestConfig:
    """A validated best configuration, and where it came from."""

    origin: str  # the file path, or "search run <id>"
    adapter: dict[str, Any]
    training: dict[str, Any]  # without seed, output_dir and eval_test (the promotion's own)
    objective: dict[str, Any]
    scores: dict[str, float] = field(default_factory=dict)
    source: str = ""  # the search's own note: "<space file>: stability config-1 (trial 3)"
    text: str = ""  # the file as read, logged with the run
    search_run_id: str | None = None
    experiment: str | None = None  # the search's experiment
    resources: dict[str, Any] = field(default_factory=dict)  # the search space's `resources:`
    # the router at the search's last evaluation: {min_batch_entropy, collapsed_layers}, or {}
    routing: dict[str, Any] = field(default_factory=dict)


def parse_best_config(text: str, name: str) -> BestConfig:
    """Validate a best-config document (keys, then the config dataclasses' own checks).

    Raises:
        SpaceError: One line naming the file, the key and its line.
    """
    raw, root_node = parse_yaml(text, name)
    c = Checker(name, root_node)
    if not isinstance(raw, dict):
        raise SpaceError(f"{name}: expected a mapping with adapter: and training:, got {raw!r}")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise c.unknown(str(key), str(key), _TOP_LEVEL)
    from graphlora.config import MoELoRAConfig
    from graphlora.run import TrainConfig

    sections = {}
    for section, allowed in (
        ("adapter", field_names(MoELoRAConfig)),
        ("training", field_names(TrainConfig)),
    ):
        if section not in raw:
            raise SpaceError(f"{name}: {section}: missing required key")
        values = c.mapping(section, raw[section])
        for key in values:
            if section == "training" and key == "seed":
                raise c.error(f"{section}.{key}", "set by the promotion; use --seeds")
            if key not in allowed:
                raise c.unknown(f"{section}.{key}", key, allowed)
        sections[section] = {k: v for k, v in values.items() if k not in _SET_HERE}
    scores = c.mapping("scores", raw.get("scores") or {})
    for key, value in scores.items():
        c.value(f"scores.{key}", value, "number")
    routing = c.mapping("routing", raw.get("routing") or {})
    for key, value in routing.items():
        if key not in _ROUTING_KEYS:
            raise c.unknown(f"routing.{key}", str(key), _ROUTING_KEYS)
        if key == "min_batch_entropy":
            c.value(f"routing.{key}", value, "number")
        elif not isinstance(value, list):
            raise c.error(f"routing.{key}", f"expected a list of layer indices, got {value!r}")
        else:
            for i in value:
                c.value(f"routing.{key}", i, "int")
    best = BestConfig(
        origin=name,
        adapter=sections["adapter"],
        training=sections["training"],
        objective={  # what promotion uses: the primary objective (a secondary is the search's)
            k: v
            for k, v in c.section("objective", raw.get("objective")).items()
            if k in _OBJECTIVE_KEYS
        },
        scores=dict(scores),
        source=str(raw.get("source") or ""),
        routing=dict(routing),
        text=text,
    )
    build_configs(best, best.training, c=c)
    return best


def build_configs(
    best: BestConfig,
    training: dict[str, Any],
    *,
    c: Checker | None = None,
    overridden: set[str] = frozenset(),
) -> tuple[Any, Any]:
    """(TrainConfig, MoELoRAConfig) of a run, or a SpaceError blaming the file key or the flag."""
    from graphlora.config import MoELoRAConfig
    from graphlora.run import TrainConfig

    c = c or Checker(best.origin, None)
    built = []
    for section, cls, values in (
        ("adapter", MoELoRAConfig, best.adapter),
        ("training", TrainConfig, {**training, "seed": 0}),
    ):
        try:
            built.append(cls.from_dict(values))
        except (TypeError, ValueError) as exc:
            key, _, why = first_line(exc).partition(": ")
            if section == "training" and key in overridden:
                raise SpaceError(f"{_FLAGS[key]}: {why}") from exc
            raise c.rejected(section, cls, exc, values) from exc
    adapter, train = built
    return train, adapter


def read_best_config_file(path: str | Path) -> BestConfig:
    """`parse_best_config` of a file."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_best_config(text, str(path))


def find_search_run(client: Any, ref: str, uri: str) -> Any:
    """The search run `ref` names: a run id, or an experiment name meaning its latest finished
    search (a top-level run tagged kind=search, completed).

    Raises:
        PromotionError: No such run or experiment; not a search run; not finished.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    exp = client.get_experiment_by_name(ref)
    if exp is None:
        try:
            run = client.get_run(ref)
        except MlflowException:
            raise PromotionError(
                f"--from-search {ref}: no MLflow run with this id and no experiment of this name "
                f"in {uri}; see `mlflow ui` for run ids"
            ) from None
    else:
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.kind = 'search'",
            order_by=["attributes.start_time DESC"],
        )
        searches = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
        if not searches:
            raise PromotionError(f"--from-search {ref}: experiment {ref!r} holds no search run")
        done = [r for r in searches if _search_state(r) == "finished"]
        if not done:
            latest = searches[0]
            raise PromotionError(
                f"--from-search {ref}: experiment {ref!r} has no finished search; the latest, "
                f"{latest.info.run_name} ({latest.info.run_id}), {_search_state(latest)}"
            )
        run = done[0]
    tags = run.data.tags
    if tags.get("kind") != "search" or MLFLOW_PARENT_RUN_ID in tags:
        what = f"a {tags.get('kind', 'untagged')} run"
        if MLFLOW_PARENT_RUN_ID in tags:
            what += f" inside search run {tags[MLFLOW_PARENT_RUN_ID]}"
        raise PromotionError(
            f"--from-search {ref}: {run.info.run_name} is {what}, not a search run; pass the "
            "search's run id or its experiment name"
        )
    state = _search_state(run)
    if state != "finished":
        raise PromotionError(
            f"--from-search {ref}: search run {run.info.run_name} ({run.info.run_id}) {state}"
        )
    return run


def _search_state(run: Any) -> str:
    """'finished', or why a search run cannot be promoted (a phrase after its name)."""
    status, tag = run.info.status, run.data.tags.get("status")
    if status == "FINISHED" and tag == "completed":
        return "finished"
    if status == "RUNNING":
        return "is still running (unfinished); wait for it to finish"
    reason = run.data.tags.get("status_reason")
    return f"did not finish ({status.lower()}{': ' + reason if reason else ''}); run a new search"


def best_config_from_search(ref: str) -> BestConfig:
    """Download and validate the `best_config.yaml` of the search run `ref` names.

    Raises:
        PromotionError: See `find_search_run`; or the run has no best configuration.
        SpaceError: The best configuration no longer validates.
        TrackingError: The MLflow store is unreachable.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_store(uri)
    client = MlflowClient(uri)
    run = find_search_run(client, ref, uri)
    run_id = run.info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    if BEST_CONFIG not in names:
        raise PromotionError(
            f"--from-search {ref}: search run {run.info.run_name} ({run_id}) has no "
            f"{BEST_CONFIG} (no trial finished); run a new search"
        )
    with tempfile.TemporaryDirectory(prefix="graphlora-best-") as tmp:
        text = Path(client.download_artifacts(run_id, BEST_CONFIG, tmp)).read_text()
        space = {}
        if "space.yaml" in names:
            space = yaml.safe_load(
                Path(client.download_artifacts(run_id, "space.yaml", tmp)).read_text()
            )
    best = parse_best_config(text, f"search run {run_id}: {BEST_CONFIG}")
    best.origin = f"search run {run_id}"
    best.search_run_id = run_id
    best.experiment = client.get_experiment(run.info.experiment_id).name
    best.resources = dict((space or {}).get("resources") or {})
    return best


def best_config_from_run(run_id: str) -> BestConfig:
    """The configuration one run trained (a search trial, a stability run or config, a
    promotion), rebuilt from its `adapter.*` / `training.*` params (`pipelines/records.py`);
    objective and resources come from its search's `space.yaml` when it has one.

    Raises:
        PromotionError: No such run, or a run without a configuration in its params.
        SpaceError: The configuration no longer validates.
        TrackingError: The MLflow store is unreachable.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from pipelines.records import COLLAPSED_TAG, collapsed_from_text, config_from_params

    uri = tracking_uri()
    check_store(uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise PromotionError(
            f"--from-run {run_id}: no MLflow run with this id in {uri}; see `mlflow ui` (a trial "
            "run's id is on its run page)"
        ) from None
    try:
        adapter, training = config_from_params(run.data.params)
    except ValueError as exc:
        raise PromotionError(
            f"--from-run {run_id}: {run.info.run_name} holds {exc}; pass a trial, stability or "
            "promotion run (or --from-search for a search run)"
        ) from None
    for key in _SET_HERE:
        training.pop(key, None)
    # The search the run belongs to (a stability seed run sits two levels down).
    space: dict[str, Any] = {}
    parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    while parent and not space:
        up = client.get_run(parent)
        if up.data.tags.get("kind") == "search":
            names = {a.path for a in client.list_artifacts(parent)}
            if "space.yaml" in names:
                with tempfile.TemporaryDirectory(prefix="graphlora-run-") as tmp:
                    path = client.download_artifacts(parent, "space.yaml", tmp)
                    space = yaml.safe_load(Path(path).read_text()) or {}
            break
        parent = up.data.tags.get(MLFLOW_PARENT_RUN_ID)
    objective = {k: v for k, v in (space.get("objective") or {}).items() if k in _OBJECTIVE_KEYS}
    source = f"{run.info.run_name} ({run_id})"
    doc: dict[str, Any] = {"source": source, "objective": objective}
    if "routing/min_batch_entropy" in run.data.metrics:  # a trial or stability seed run
        doc["routing"] = {
            "min_batch_entropy": run.data.metrics["routing/min_batch_entropy"],
            "collapsed_layers": collapsed_from_text(run.data.tags.get(COLLAPSED_TAG)),
        }
    doc.update({"adapter": adapter, "training": training})
    text = yaml.safe_dump(doc, sort_keys=False)
    best = parse_best_config(text, f"run {run_id}: params")
    best.origin = f"run {run_id}"
    best.search_run_id = run_id
    best.experiment = client.get_experiment(run.info.experiment_id).name
    best.resources = dict(space.get("resources") or {})
    return best
