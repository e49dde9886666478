"""MLflow for searches: where the store lives, one parent run per search, child runs per trial.

Store: `MLFLOW_TRACKING_URI` when set, else SQLite at `$GRAPHLORA_HOME/mlflow.db` (a fixed
absolute path: `ray job submit --working-dir .` runs the driver in a temporary copy), artifacts
under `$GRAPHLORA_HOME/mlartifacts` for any database URI (README, "Browse MLflow").

Run layout in one experiment::

    search <name>                      parent: space file, results.csv, best_config.yaml, plots
                                       (pictures.py, Optuna's), summed cost, a description
      trial <id>                       full config as params, metrics per step, dataset inputs,
                                       routing_counts.json, tags status/status_reason
      stability config-1               one per re-run configuration: seed mean/std
        stability config-1 seed 3      one per seed

What each run records: `pipelines/records.py`.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipelines.errors import first_line
from pipelines.storage import StorageError, masked
from pipelines.storage import check as check_database

# mlflow is imported where it is used: processes that import this module without talking to
# MLflow (e.g. the search CLI refusing bad input) skip its ~1.3 s import.
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID

# Values of the `status` tag on trial and seed runs.
COMPLETED = "completed"
STOPPED_EARLY_ASHA = "stopped_early_asha"
FAILED = "failed"
INTERRUPTED = "interrupted"  # the search was stopped (Ctrl-C, SIGTERM); `--resume` continues it
JOURNAL = "unrecorded.jsonl"  # in a search's folder: writes the store could not take (`Tracker`)


_SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential")


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params with secret-looking names (token, secret, password...) masked: a value such as a
    Hub token must never be written into an MLflow store that others can browse."""
    return {
        k: "***" if any(w in k.lower() for w in _SECRET_WORDS) else v for k, v in params.items()
    }


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message is one line saying what to do."""


class StoreLost(TrackingError):
    """The MLflow store stopped answering mid-search (a read or a new run could not wait for it);
    the `Tracker` has already told its `on_lost` and keeps further writes in its journal."""


# MLflow's codes for a store that failed (its retries spent), not for a request it refused.
_TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def store_unreachable(exc: BaseException) -> bool:
    """True when `exc` means the store (or the database behind a tracking server) did not answer,
    after MLflow's own HTTP retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, about two minutes by
    default); False for a request the store refused (a bad value), which is a bug to raise."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("requests", "urllib3", "sqlalchemy", "psycopg", "psycopg2")


def graphlora_home() -> Path:
    """Fixed, absolute home for local stores: `$GRAPHLORA_HOME`, default `~/.graphlora`."""
    return Path(os.environ.get("GRAPHLORA_HOME", "~/.graphlora")).expanduser().resolve()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else `sqlite:///<home>/mlflow.db` (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{graphlora_home() / 'mlflow.db'}"


def check_store(uri: str) -> None:
    """Fail fast, in one line, on a store that cannot work (before any Ray work starts)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow server {uri} (MLFLOW_TRACKING_URI) is unreachable: "
                f"{getattr(exc, 'reason', exc)}; start it (see cluster.yaml) or forward its "
                "port, or unset MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from exc
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"cannot create the MLflow store folder {folder}: "
                f"{exc.strerror}; set GRAPHLORA_HOME to a writable folder"
            ) from exc
        if not os.access(folder, os.W_OK):
            raise TrackingError(
                f"MLflow store folder {folder} is not writable; "
                "set GRAPHLORA_HOME to a writable folder"
            )
    elif is_database(uri):  # PostgreSQL, MySQL: reachable, with a driver, or one line
        try:
            check_database(uri, "MLflow store", "MLFLOW_TRACKING_URI")
        except StorageError as exc:
            raise TrackingError(str(exc)) from None
    elif uri.split(":", 1)[0] in ("databricks", "databricks-uc", "uc"):
        return  # hosted MLflow: its own client says what is missing (host, token)
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri}: the file store is deprecated in MLflow 3; "
            "use sqlite:///ABSOLUTE/PATH/mlflow.db or an http:// server"
        )


def is_database(uri: str) -> bool:
    """A database store MLflow opens directly (SQLite, PostgreSQL, MySQL...): no artifact
    root of its own, unlike a tracking server."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return scheme.split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql")


def ui_link(experiment_id: str, uri: str | None = None) -> str:
    """Where a person can see the runs table of this experiment."""
    uri = uri or tracking_uri()
    page = f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/") + page
    return (
        f"mlflow ui --backend-store-uri {masked(uri)} --host 127.0.0.1 --port 5000  "
        f"then open http://127.0.0.1:5000{page}"
    )


class Tracker:
    """Thin, thread-safe wrapper over `MlflowClient` for one experiment (no active-run globals).

    With a `journal` file set (a search's `unrecorded.jsonl`), a write the store cannot take
    (`store_unreachable`) is not lost: it and every write after it go to the journal, `on_lost`
    is told once (the search stops, its state saved), and `replay` writes them when the search
    resumes. Reads and new runs cannot wait: they raise `StoreLost`.
    """

    journal: Path | None = None
    lost: str | None = None  # why the store was given up on, once it was
    on_lost: Callable[[str], None] | None = None

    def __init__(self, experiment: str, uri: str | None = None) -> None:
        """Connect and get or create the experiment.

        Raises:
            TrackingError: The store is unreachable or misconfigured.
        """
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        check_store(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if is_database(self.uri):  # a server or a hosted store sets its own
                    location = (graphlora_home() / "mlartifacts" / experiment).as_uri()
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location
                )
            else:
                if exp.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"MLflow experiment {experiment!r} is deleted; restore "
                        "it in the UI or choose another mlflow.experiment"
                    )
                self.experiment_id = exp.experiment_id
        except TrackingError:
            raise
        except Exception as exc:  # mlflow raises many types; all mean the same to a person
            raise TrackingError(
                f"MLflow store {masked(self.uri)} is not usable: {first_line(exc)}"
            ) from exc

    def start_run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Create a run (nested under `parent_run_id` if given) and return its id."""
        from mlflow.entities import Param

        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self._read(self.client.create_run, self.experiment_id, tags=all_tags, run_name=name)
        if params:
            self._read(
                self.client.log_batch,
                run.info.run_id,
                params=[Param(k, str(v)[:6000]) for k, v in redact(params).items()],
            )
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric entries of `metrics` at `step` (others are skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if batch:
            self._write("metrics", run_id, [[m.key, m.value, m.timestamp, m.step] for m in batch])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._write("tags", run_id, {k: str(v)[:5000] for k, v in tags.items()})

    def finish(self, run_id: str, status: str, reason: str | None = None) -> None:
        """Tag a run with `status` (completed / stopped_early_asha / failed / interrupted) and
        close it; MLflow's own status is FAILED for failures, KILLED for an interrupted run (a
        resumed search re-opens it), FINISHED otherwise."""
        tags = {"status": status}
        if reason:
            tags["status_reason"] = reason
        self.set_tags(run_id, tags)
        mlflow_status = {FAILED: "FAILED", INTERRUPTED: "KILLED"}.get(status, "FINISHED")
        self._write("status", run_id, mlflow_status)

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed search or trial); `finish` closes it again."""
        self._write("status", run_id, "RUNNING")

    def child_runs(self, parent_run_id: str) -> list[Any]:
        """Every run nested directly under `parent_run_id`, oldest first."""
        return self._read(
            self.client.search_runs,
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=50000,
        )

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._write("file", run_id, [str(Path(path).resolve()), artifact_path])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write("text", run_id, [text, artifact_file])

    def _apply(self, op: str, run_id: str, arg: Any) -> None:
        """One write, as `_write` records it."""
        from mlflow.entities import Metric, RunTag

        if op == "metrics":
            self.client.log_batch(run_id, metrics=[Metric(*m) for m in arg])
        elif op == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in arg.items()])
        elif op == "status":
            if arg == "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            else:
                self.client.set_terminated(run_id, arg)
        elif op == "file":
            self.client.log_artifact(run_id, arg[0], arg[1])
        elif op == "text":
            self.client.log_text(run_id, arg[0], arg[1])
        else:
            raise ValueError(f"unknown journal entry {op!r}")

    def _write(self, op: str, run_id: str, arg: Any) -> None:
        if self.lost is None:
            try:
                self._apply(op, run_id, arg)
                return
            except Exception as exc:
                if self.journal is None or not store_unreachable(exc):
                    raise
                self._lose(exc)
        with open(self.journal, "a") as f:  # type: ignore[arg-type] - set whenever lost is
            f.write(json.dumps([op, run_id, arg]) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _read(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read (or a new run) now; `StoreLost` when the store is gone."""
        if self.lost is not None:
            raise StoreLost(self.lost)
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if self.journal is None or not store_unreachable(exc):
                raise
            self._lose(exc)
            raise StoreLost(self.lost) from exc

    def _lose(self, exc: BaseException) -> None:
        self.lost = f"the MLflow store {masked(self.uri)} stopped answering: {first_line(exc)}"
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def replay(self) -> int:
        """Write what the journal holds (in order), then remove it; the number of writes.

        Raises:
            TrackingError: the store refused one; the journal keeps it and what follows.
        """
        if self.journal is None or not self.journal.exists():
            return 0
        entries = [json.loads(line) for line in self.journal.read_text().splitlines() if line]
        for done, (op, run_id, arg) in enumerate(entries):
            try:
                self._apply(op, run_id, arg)
            except Exception as exc:
                rest = "".join(json.dumps(e) + "\n" for e in entries[done:])
                self.journal.write_text(rest)
                raise TrackingError(
                    f"cannot write {len(entries) - done} records kept in {self.journal} while "
                    f"the MLflow store was unreachable: {first_line(exc)}; retry when it is back"
                ) from exc
        self.journal.unlink()
        return len(entries)

    def ui_link(self) -> str:
        return ui_link(self.experiment_id, self.uri)


def save_optuna_plots(study: Any, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Optimization history, parameter importances and parallel coordinates as PNGs.

    Uses Optuna's matplotlib backend (plotly is not a dependency). On a multi-objective study
    (`objective.secondary`) each plot shows the first objective (Optuna needs a `target` there).
    Returns the files written and, for each plot that could not be drawn (e.g. too few completed
    trials), a one-line reason.
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    target = {}
    if len(study.directions) > 1:
        target = {"target": lambda t: t.values[0], "target_name": "objective"}
    for name, plot in (
        ("optimization_history", ovm.plot_optimization_history),
        ("param_importances", ovm.plot_param_importances),
        ("parallel_coordinate", ovm.plot_parallel_coordinate),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study, **target)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
        except Exception as exc:  # a plot is a nicety; say why it is missing and go on
            skipped.append(f"{name}: {first_line(exc)}")
    return written, skipped
