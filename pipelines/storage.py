"""Where a search's Optuna study lives: `optuna.db` in the search's results folder by default, or
a shared database (`--optuna-storage URL`, else `GRAPHLORA_OPTUNA_STORAGE`, else the space's
`optuna_storage:`), e.g. `postgresql://graphlora@db.internal:5432/optuna`, its password never in
the URL (PostgreSQL's client reads `PGPASSWORD` or `~/.pgpass`). README, "A shared tracking
server and a shared Optuna study", says what a shared study allows; each driver beats a heartbeat
for its trials (`HEARTBEAT_S`), so a dead driver's trial is marked FAILED after `GRACE_S`.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

from pipelines.errors import first_line

ENV = "GRAPHLORA_OPTUNA_STORAGE"
STUDY_FILE = "optuna.db"  # the default study, in the search's results folder
HEARTBEAT_S = 30  # a driver records a beat for each trial it holds this often
GRACE_S = 180  # a RUNNING trial with no beat for this long belongs to a dead driver
CONNECT_TIMEOUT_S = 5
# A driver's module -> the package that installs it (SQLAlchemy 2.1's postgresql:// is psycopg 3).
_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


class StorageError(ValueError):
    """The Optuna storage URL cannot be used; the message is one line saying what to do."""


def resolve(flag: str | None, space_value: str | None) -> str | None:
    """The shared storage URL chosen by flag, environment or space (in that order), or None for
    the default SQLite file in the search's folder."""
    return flag or os.environ.get(ENV) or space_value or None


def default_url(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir) / STUDY_FILE}"


def masked(url: str) -> str:
    """The URL with any password hidden (for messages and the search's state file)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide that a person would not see anyway
        return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):  # pre-ping: a restarted server's dead connections are dropped
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    return {}


def check(
    url: str, what: str = "Optuna storage", setting: str = f"{ENV} / --optuna-storage"
) -> None:
    """Refuse, in one line, a storage URL that is malformed, has no driver installed, or whose
    database cannot be reached (before Ray starts and before the first trial). `what` and
    `setting` name the store and where its URL came from, for the message.

    Raises:
        StorageError: what is wrong and what to do.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    shown = masked(url)
    try:
        parsed = make_url(url)
    except Exception:
        raise StorageError(
            f"{what} {shown!r} is not a database URL; use e.g. "
            "postgresql://USER@HOST:5432/DB or sqlite:////ABSOLUTE/PATH/optuna.db"
        ) from None
    dialect = parsed.get_backend_name()
    if dialect not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(
            f"{what} {shown}: {dialect!r} is not supported; use postgresql://, "
            "mysql:// or sqlite:///"
        )
    try:
        parsed.get_dialect()
        engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    except ImportError as exc:
        raise StorageError(
            f"{what} {shown}: its database driver is not installed ({exc.name}); "
            f"pip install '{_PACKAGES.get(exc.name or '', exc.name)}'"
        ) from None
    except Exception as exc:
        raise StorageError(f"{what} {shown}: {first_error_line(exc)}") from None
    try:
        with engine.connect():
            pass
    except Exception as exc:
        raise StorageError(
            f"{what} {shown} is unreachable: {first_error_line(exc)}; start the database "
            f"or fix {setting}"
        ) from None
    finally:
        engine.dispose()


def first_error_line(exc: BaseException) -> str:
    """A database error's first line (SQLAlchemy's wrapped driver error, not its SQL)."""
    return first_line(getattr(exc, "orig", None) or exc)


def unreachable(exc: BaseException) -> bool:
    """True when `exc` says the study's database did not answer (stopped, restarted, the
    network gone), not that it refused a statement."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    lost = (OperationalError, InterfaceError, DisconnectionError, OSError)
    if isinstance(exc, StorageInternalError):  # Optuna's wrap of a failed commit: its cause
        cause = exc.__cause__ or exc.__context__
        return cause is None or isinstance(cause, lost)
    return isinstance(exc, lost)


def open_storage(url: str) -> Any:
    """Optuna's RDB storage on `url`; with a shared database (not the SQLite file) the heartbeat
    is on, so a dead driver's RUNNING trials can be failed (`Heartbeat`)."""
    import warnings

    import optuna

    shared = not url.startswith("sqlite")
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=HEARTBEAT_S if shared else None,
            grace_period=GRACE_S if shared else None,
        )


def for_resume(saved: str | None, chosen: str | None) -> None:
    """A resumed search uses the study it started with.

    Args:
        saved: The masked URL in the search's state (None: its SQLite file).
        chosen: The URL chosen for this run (`resolve`).

    Raises:
        StorageError: the two differ (the password is not compared).
    """
    if saved == (masked(chosen) if chosen else None):
        return
    if saved is None:
        raise StorageError(
            f"this search's Optuna study is its {STUDY_FILE}, not {masked(chosen or '')}; "
            f"unset {ENV} / --optuna-storage to resume it"
        )
    raise StorageError(
        f"this search's Optuna study is in {saved}; set {ENV} (or --optuna-storage) to that "
        "URL, with its password in PGPASSWORD or ~/.pgpass, to resume it"
    )


class Heartbeat:
    """A daemon thread that, every `HEARTBEAT_S`, records a beat for each Optuna trial a searcher
    holds unfinished, then fails the study's stale trials (those of dead drivers).

    Optuna beats only inside `Study.optimize`; Ray Tune's `OptunaSearch` asks and tells, so the
    searcher starts this on its first suggestion (`pipelines/tuning.py`). The thread holds the
    searcher weakly and ends with it.
    """

    def __init__(self, searcher: Any) -> None:
        self._searcher = weakref.ref(searcher)
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self._stop = threading.Event()

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        """One round: a beat for every held unfinished trial, then the stale trials failed."""
        import warnings

        import optuna

        searcher = self._searcher()
        if searcher is None:
            self._stop.set()
            return
        study = searcher._ot_study
        storage = study._storage
        done = searcher._completed_trials
        for trial_id, trial in list(searcher._ot_trials.items()):
            if trial_id not in done:
                storage.record_heartbeat(trial._trial_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except Exception:  # a database blip: the next beat tries again
                pass
