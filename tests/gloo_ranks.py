"""Data parallelism on a CPU, for tests: a script run on several gloo ranks, one process each.

A rank's script starts with ``rank, world, args = join()`` (one thread, the process group
joined through a file store: no race for a free port with other tests) and prints one line
``RESULT <json>``; ``run_on_ranks`` returns each rank's result, in rank order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


def join() -> tuple[int, int, list[str]]:
    """In a rank's process: join the process group; returns (rank, world, the other args)."""
    import torch
    import torch.distributed as dist

    rank, world, store, *args = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=int(rank), world_size=int(world)
    )
    return int(rank), int(world), args


def result(value: Any) -> None:
    """In a rank's process: report `value` (JSON) and leave the process group."""
    import torch.distributed as dist

    print("RESULT " + json.dumps(value), flush=True)
    dist.destroy_process_group()


def run_on_ranks(
    script: str, tmp_path: Path, *args: str, world: int = 2, timeout: float = 300
) -> list[Any]:
    """Run `script` on `world` gloo ranks (`args` after each rank's own); every rank must exit 0
    (its stderr is shown otherwise). Returns the ranks' `result`s."""
    path = tmp_path / "rank_script.py"
    path.write_text(script)
    store = tmp_path / "gloo_store"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(path), str(rank), str(world), str(store), *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(world)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {rank}:\n{err[-3000:]}"
    return [
        json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        for out, _ in outs
    ]
