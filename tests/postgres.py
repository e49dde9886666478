"""A real PostgreSQL server for the tests: its own data folder in a temporary directory, on
127.0.0.1 and a free port, a database and a user (password auth) for the search; stopped at the
end. Started by the tests themselves, so CI needs only the server binaries (`.ci/run` installs
them where they are missing), no running daemon.

PostgreSQL refuses to run as root: as root, the server and its tools run as the `postgres`
system user (which Debian's package creates), in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER, PASSWORD, DATABASE = "graphlora", "graphlora-test", "graphlora"


def _version(initdb: str) -> int:
    version = initdb.split("/")[4]
    return int(version) if version.isdigit() else 0


def server_bin() -> Path | None:
    """The newest installed server's bin folder (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server; `start()`, `stop()` (as a crash or an operator would), `start()` again."""

    def __init__(self) -> None:
        self.bin = server_bin()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb) on this machine")
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="pg"))
        self.data = self.root / "data"
        self.port = free_port()
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        (pwfile := self.root / "superuser.pw").write_text("unused\n")
        if self.as_root:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
            "--auth-local=trust", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    @property
    def url(self) -> str:
        """The search's database (SQLAlchemy / MLflow / Optuna URL)."""
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def url_for(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> str:
        cmd = [str(self.bin / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{tool} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    def start(self) -> None:
        # Loopback only, TCP; the Unix socket in our own folder (not /var/run/postgresql).
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t",
                  "60", "-o", options, "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the folder's Unix socket."""
        return self._run(
            "psql", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d",
            database, "-v", "ON_ERROR_STOP=1", "-tAc", statement,
        )  # fmt: skip

    def create_database(self, name: str) -> str:
        """A new database owned by the search's user; its URL."""
        self.sql(f"CREATE DATABASE {name} OWNER {USER}")
        return self.url_for(name)

    def setup(self) -> None:
        """The user and database, as the README creates them."""
        self.sql(f"CREATE USER {USER} WITH PASSWORD '{PASSWORD}'")
        self.create_database(DATABASE)

    def close(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


def wait_until_up(server: PostgresServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.sql("SELECT 1")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
