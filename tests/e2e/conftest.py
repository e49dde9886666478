"""A real local Ray (2 CPUs) and a real MLflow store (SQLite in a temp GRAPHLORA_HOME) for the
end-to-end tests, which train with the library's `graphlora.train.run_training`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def graphlora_home(tmp_path_factory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("graphlora-home")
    saved = {k: os.environ.get(k) for k in ("GRAPHLORA_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["GRAPHLORA_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
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


@pytest.fixture(scope="session")
def asha_search(ray_cluster, tmp_path_factory) -> tuple:
    """One ASHA search (5 trials, 2 at a time, on 2 CPUs) shared by the tests that check it and
    the promotion test that promotes its best configuration: (space, SearchResult, progress)."""
    import io

    from test_search_e2e import make_space

    from pipelines.search import run_search

    tmp = tmp_path_factory.mktemp("asha")
    space = make_space(tmp, trials=5, experiment="asha")
    out = io.StringIO()
    result = run_search(space, output_dir=tmp / "out", out=out)
    return space, result, out.getvalue()


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
