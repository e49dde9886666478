"""The search's console is its own: what Ray, Ray Tune, MLflow, Optuna and Alembic say while a
search runs goes to `driver.log` in the search's folder, not between its progress lines.

What moves there: Ray Tune's note that the define-by-run space took a while, its "Stop signal
received" / "Resume experiment with: Tuner.restore(...)" lines on an interrupt (the search prints
its own resume line), MLflow's "Creating initial MLflow database tables", Optuna's "A new study
created", Ray's start-up lines, and Python warnings. Not printed at all: Tune's "Configuration
for experiment" box and TensorBoard hint (its classic reporter, silent at verbose 0, replaces the
new one) and MLflow's "Downloading artifacts" progress bars. The search's progress lines,
tables, `error:` lines and resume hint stay on the console. Ray workers' own output is not
forwarded to the driver at all (`log_to_driver=False` in `pipelines/tuning.py`): it stays in
the Ray session's log folder.

`library_output_to_log()` is for CLIs only; a search run from Python (tests, notebooks) keeps
the libraries' console output as they configure it.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

DRIVER_LOG = "driver.log"
# The loggers these libraries configure with their own console handlers (propagate off), so each
# must be redirected by name; "py.warnings" is where `logging.captureWarnings` sends warnings.
LIBRARY_LOGGERS = (
    "ray",
    "ray.data",
    "mlflow",
    "optuna",
    "alembic",
    "sqlalchemy.engine",
    "huey",
    "py.warnings",
)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DriverLog(logging.Handler):
    """Holds records until the search's folder is known (MLflow and Optuna speak before it
    exists), then writes them, and every later one, to its `driver.log`."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < 10_000:
            self.held.append(record)

    def open(self, path: Path) -> None:
        if self.file is not None and Path(self.file.baseFilename) == path.resolve():
            return
        if self.file is not None:
            self.file.close()
        self.file = logging.FileHandler(path, encoding="utf-8")
        # Its own formatter: ray.init re-formats the handlers of the "ray" logger (this one).
        self.file.setFormatter(logging.Formatter(_FORMAT))
        for record in self.held:
            self.file.emit(record)
        self.held.clear()

    def close(self) -> None:
        if self.file is None and self.held:  # ended before it had a folder (a refused resume...)
            from pipelines.tracking import graphlora_home

            try:
                self.open(graphlora_home() / DRIVER_LOG)
            except OSError:
                pass
        if self.file is not None:
            self.file.close()
        super().close()


_HANDLER: _DriverLog | None = None


def library_output_to_log() -> None:
    """Send the libraries' log lines and Python warnings to the driver log (held until
    `log_to` names the search's folder). Idempotent: call it again after `ray.init`, which may
    configure Ray's loggers anew."""
    global _HANDLER
    # Tune's default ("new") reporter prints its experiment box and TensorBoard hint with
    # print(), whatever RunConfig(verbose=0) says; the classic reporter at verbose 0 prints nothing
    # (RAY_AIR_NEW_OUTPUT=1 in the environment brings the box back).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # MLflow draws a "Downloading artifacts" bar on stderr for every artifact the search reads
    # back at its end (the load maps), read at each download.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # With a tracking server, MLflow writes "View run ... / View experiment ..." to stdout as
    # each run ends, two lines per trial between the search's own; the search prints its link.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow  # noqa: F401 - configures its loggers on import; replaced below
    import optuna

    optuna.logging.disable_default_handler()  # else optuna re-adds it on its first log line
    if _HANDLER is None:
        _HANDLER = _DriverLog()
        atexit.register(_HANDLER.close)
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [_HANDLER]
        logger.propagate = False
        if name == "ray.data":
            logger.setLevel(logging.INFO)


def log_to(folder: Path) -> Path | None:
    """Write the driver log in `folder` from now on (with what was held); a no-op, returning
    None, when `library_output_to_log` was not called (a search run from Python)."""
    if _HANDLER is None:
        return None
    path = Path(folder) / DRIVER_LOG
    _HANDLER.open(path)
    return path
