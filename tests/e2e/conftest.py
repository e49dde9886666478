"""A real local Ray (2 CPUs) and a real MLflow store (SQLite in a temp GRAPHLORA_HOME) for the
end-to-end tests, run against `graphlora.train.run_training` when it exists, else the stand-in."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def e2e_backends() -> list[str]:
    """The real training function when the library has it, else the stand-in; override with
    GRAPHLORA_E2E_BACKENDS=standin,graphlora (each backend doubles the e2e time)."""
    if os.environ.get("GRAPHLORA_E2E_BACKENDS"):
        return os.environ["GRAPHLORA_E2E_BACKENDS"].split(",")
    try:
        if hasattr(importlib.import_module("graphlora.train"), "run_training"):
            return ["graphlora"]
    except ImportError:
        pass
    return ["standin"]


@pytest.fixture(params=e2e_backends())
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def graphlora_home(tmp_path_factory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("graphlora-home")
    saved = {
        k: os.environ.get(k)
        for k in ("GRAPHLORA_HOME", "MLFLOW_TRACKING_URI", "GRAPHLORA_STANDIN_STEP_S")
    }
    os.environ["GRAPHLORA_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["GRAPHLORA_STANDIN_STEP_S"] = "0.01"
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(graphlora_home) -> Iterator[None]:
    """Local Ray with 2 CPUs, started after the environment above so workers inherit it."""
    import ray

    from pipelines.search import init_ray

    saved = os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
