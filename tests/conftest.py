from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny_models import VOCAB  # noqa: E402

# Tiny models run fastest on one thread; on a small shared machine, more threads oversubscribe
# the cores (scoring a tiny model took 12 s on 2 threads, 0.12 s on 1).
torch.set_num_threads(1)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def postgres() -> Iterator:
    """A real PostgreSQL server on 127.0.0.1 (`tests/postgres.py`) with the search's user and
    database. In CI (CI=true) a server that cannot start fails the test; elsewhere it skips,
    saying why."""
    from postgres import PostgresServer

    try:
        server = PostgresServer()
        server.start()
        server.setup()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        message = f"PostgreSQL could not start: {str(exc).splitlines()[0]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message + " (install postgresql-15; in CI this fails)")
    yield server
    server.close()
