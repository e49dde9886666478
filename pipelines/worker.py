"""Layer 1 of a search: what runs on every Ray Train worker (`train_fn_per_worker`: one seed of
one trial, reporting each evaluation and reading ASHA's stop flag, `pipelines/asha.py`), and the
`TorchTrainer` of one seed (`seed_trainer`, `fit_seed`), for search trials and promotion alike.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from pipelines.errors import error_line

VERDICT_WAIT_S = 60.0  # longest a Train run waits for ASHA's verdict on an evaluation
TRAIN_POLL_S = "0.1"  # Ray Train controller poll interval, unless the environment sets one
NONFINITE = "nonfinite"  # key of what `train_fn_per_worker` returns when the loss diverged


def fast_train_reports() -> None:
    """Ray Train forwards its workers' reports every 2 s by default: dead time per evaluation
    that ASHA's verdict would wait for. Poll every `TRAIN_POLL_S` unless the environment says
    otherwise; read when a Train run starts, so call it before building one."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, str] | None:
    """Train one seed of one trial on this worker.

    A run whose loss turns non-finite returns `{"nonfinite": message}` instead of raising: Ray
    Train restarts a group whose worker raised, and the same data and seed would fail the same
    way `resources.worker_retries` more times. `fit_seed` raises it in the caller.

    After every evaluation the full training state goes to Ray Train as a checkpoint; when a
    worker dies, Ray Train restarts the group (`resources.worker_retries` times) and this function
    continues from the last checkpoint, first re-reporting that checkpoint's evaluation (the trial
    driver ignores what it has already seen). A resumed search restarts the run under the same
    name and storage path, and Ray Train hands it the same checkpoint.

    Args:
        config: `adapter` and `training` dicts (the dataclasses are built here, at the
            library's edge); optionally `save_adapter` (rank 0 attaches the trained adapter
            folder to the final report as a checkpoint), `hub` (a `pipelines.asha.HubRef`: the
            search's trial hub, by name), `trial_id` and `verdict_wait_s`: after its k-th
            evaluation the run waits up to that long for the scheduler's verdict on iteration k,
            and returns if the trial must stop.
    """
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    from graphlora.checkpoint import read_progress
    from graphlora.config import MoELoRAConfig
    from graphlora.run import NonFiniteLossError, TrainConfig
    from graphlora.train import run_training

    train_cfg = TrainConfig.from_dict(config["training"])
    adapter_cfg = MoELoRAConfig.from_dict(config["adapter"])
    hub, wait_s = config.get("hub"), config.get("verdict_wait_s", 0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    gpu = GpuUtilisation.start()  # a no-op off CUDA

    def on_eval(step: int, metrics: dict[str, float], state_dir: Path | None = None) -> bool:
        checkpoint = ray.train.Checkpoint.from_directory(state_dir) if state_dir else None
        ray.train.report({**metrics, **gpu.metrics(), "step": step}, checkpoint=checkpoint)
        if hub is None:
            return False
        # Rank 0 decides and every rank follows, so all ranks leave the loop at the same step.
        stop = None
        if rank == 0:
            iteration = eval_index(step, train_cfg.eval_every, train_cfg.max_steps)
            stop = ray.get(hub.should_stop.remote(config["trial_id"], iteration, wait_s))
        return bool(broadcast_from_rank_zero(stop) if world > 1 else stop)

    with tempfile.TemporaryDirectory(prefix="graphlora-") as tmp:
        resume_from = None
        previous = ray.train.get_checkpoint()
        if previous is not None:
            resume_from = previous.to_directory(str(Path(tmp) / "resume"))
            step, metrics = read_progress(resume_from)
            # The driver may not have seen this evaluation (it died, or the worker did, between
            # the checkpoint and the relay): say it again; the driver drops repeats.
            ray.train.report({**metrics, "step": step, "resumed": 1})
        if config.get("save_adapter"):
            # The trained adapter travels back as the run's last checkpoint (storage_path), so
            # the caller gets it from `Result.checkpoint` wherever this worker ran.
            train_cfg = dataclasses.replace(train_cfg, output_dir=str(Path(tmp) / "adapter"))
        try:
            final = run_training(
                train_cfg, adapter_cfg, on_eval=on_eval, checkpoint=True, resume_from=resume_from
            )
        except NonFiniteLossError as exc:  # every rank sees the same global loss: all return
            return {NONFINITE: str(exc)}
        finally:
            gpu.stop()
        final.update(gpu.metrics())
        adapter = None
        if config.get("save_adapter") and rank == 0:
            adapter = ray.train.Checkpoint.from_directory(train_cfg.output_dir)
        ray.train.report({**final, "final": 1}, checkpoint=adapter)
    return None


class GpuUtilisation:
    """Mean utilisation of this worker's GPU, sampled in a thread every second while it trains
    (MLflow's system metrics sample the driver's node, not the node a trial runs on)."""

    def __init__(self, device: int) -> None:
        self.device, self.samples = device, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-util")

    @classmethod
    def start(cls) -> GpuUtilisation | _NoGpu:
        """A running sampler on CUDA (when the driver can read utilisation), else a no-op."""
        import torch

        if not torch.cuda.is_available():
            return _NoGpu()
        try:
            torch.cuda.utilization(torch.cuda.current_device())
        except Exception:  # no NVML (pynvml) here: nothing to sample
            return _NoGpu()
        sampler = cls(torch.cuda.current_device())
        sampler._thread.start()
        return sampler

    def _run(self) -> None:
        import torch

        while not self._done.wait(1.0):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:
                return

    def metrics(self) -> dict[str, float]:
        return {"gpu_util_mean": sum(self.samples) / len(self.samples)} if self.samples else {}

    def stop(self) -> None:
        self._done.set()


class _NoGpu:
    def metrics(self) -> dict[str, float]:
        return {}

    def stop(self) -> None:
        pass


def seed_trainer(
    config: dict[str, Any],
    *,
    name: str,
    storage_path: str,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    worker_retries: int,
    callbacks: list | None = None,
    train_fn: Any = None,
    worker_env: dict[str, str] | None = None,
) -> Any:
    """The `TorchTrainer` of one seed: `train_fn_per_worker(config)` (or `train_fn`) on
    `workers` workers, restarted from its last checkpoint up to `worker_retries` times, keeping
    only the latest checkpoint (a resumable state, or the final adapter). Search trials, trial
    hosts (`pipelines/host.py`) and the promotion pipeline (`pipelines/promote.py`) build their
    Train runs here. `worker_env`: environment variables for the workers' processes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return TorchTrainer(
        train_fn or train_fn_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=worker_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
    )


def fit_seed(trainer: Any) -> Any:
    """`trainer.fit()` of a `seed_trainer`; raises the run's `NonFiniteLossError` (which
    `train_fn_per_worker` returns, so Ray Train does not retry it) as if rank 0 had raised it."""
    from graphlora.run import NonFiniteLossError

    result = trainer.fit()
    verdict = result.return_value
    if isinstance(verdict, dict) and verdict.get(NONFINITE):
        raise NonFiniteLossError(verdict[NONFINITE])
    return result


def worker_errors(worker_exceptions: dict, label: str = "") -> str:
    """One line for a Ray Train `after_exception` callback's errors: `<label>rank r: Type:
    first line` per rank, at most 1000 characters (for the trial's `recovery_log`)."""
    return "; ".join(
        f"{label}rank {r}: {error_line(e)}" for r, e in sorted(worker_exceptions.items())
    )[:1000]


def eval_index(step: int, eval_every: int, max_steps: int) -> int:
    """Which evaluation of a run happens at `step` (1-based; the last step always evaluates)."""
    return step // eval_every + (1 if step == max_steps and step % eval_every else 0)
