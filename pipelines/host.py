"""Layer 1 of a packed search: trial hosts, long-lived Ray Train runs that each load the frozen
base model once and train several trials' runs side by side (`graphlora.packed_train`).

With `resources.trials_per_host` set, a search starts a pool of hosts (`HostPool`) before its
first trial and stops it after its last. A Tune trial then starts no `TorchTrainer` of its own:
each of its seeds is a job it puts on the search's `HostBoard` (`run_on_host`), a free slot on a
host takes it, trains it, and relays its evaluations to the trial through the trial hub exactly
as a Train run of its own would (`pipelines/asha.py`), so the trial driver, ASHA's verdicts,
MLflow and Optuna see what they saw before. When a slot's run ends, stopped by ASHA or finished,
the slot takes the next job at once: nothing restarts.

Faults are handled as without hosts (README, "Trial hosts": a NaN ends its slot's run only; a
host's dead worker restarts it from its checkpoint, which holds every slot's state; a stopped
search resumes its hosts under the same names).

A slot's checkpoint is the one `run_training(checkpoint=True)` writes: the two are
interchangeable.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ray

from pipelines.asha import HubRef
from pipelines.errors import error_line
from pipelines.memory_check import resolve_checkpointing
from pipelines.schema import SearchSpace
from pipelines.worker import eval_index, fast_train_reports, seed_trainer, worker_errors

MANIFEST = "host.json"  # in a host checkpoint: the jobs of the slots it holds
# glibc malloc gives a packed step's working set (every slot's activations) back to the OS after
# each step and faults it in again: 1.25x the time of separate passes at a CPU FFN site, 0.97x
# with these two (BENCHMARKS.md). A CPU host's workers start with them unless the environment
# sets them; a GPU's caching allocator keeps its memory anyway.
CPU_HOST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
ABORT_POLL_S = 1.0  # how often a busy host asks whether the search was stopped
HELLO_WAIT_S = 600.0  # longest the board waits for every host's first hello


class SlotError(RuntimeError):
    """A trial's run ended in error on a host (a NaN loss, or its host lost for good)."""


@ray.remote(num_cpus=0)
class HostBoard:
    """Per-search job board between trials and hosts: trials put their runs (jobs) on it, hosts
    take them as slots free up, and tell it how each ended.

    A job is `{key, trial_id, seed_index, adapter, training, verdict_wait_s}`; its key
    (`<trial id>-seed<seed>`) names its slot and its checkpoint. A host that holds a job's
    training state from its checkpoint reserves that job: no other host starts it afresh.
    """

    def __init__(self, hub: HubRef, hosts: int) -> None:
        self._hub = hub
        self._expected = hosts  # no job is handed out before they have all said hello (or
        self._opened = time.monotonic()  # HELLO_WAIT_S has passed): a resumed host's runs
        # must not start afresh on another host that came up first
        self._queue: OrderedDict[str, dict] = OrderedDict()  # waiting for a slot
        self._owner: dict[str, str] = {}  # key -> host training it
        self._jobs: dict[str, dict] = {}  # every job known, by key
        self._reserved: dict[str, str] = {}  # key -> host holding its checkpoint
        self._ends: dict[str, dict] = {}  # key -> {"error": text or None}
        self._hosts: set[str] = set()
        self._lost: dict[str, str] = {}  # host -> why it ended for good
        self._loads: list[dict] = []  # one per base model load
        self._closed = False
        self._aborted = False
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, ready: Any, timeout_s: float) -> bool:
        if ready():
            return True
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
            except TimeoutError:
                return False
        return True

    async def submit(self, job: dict) -> None:
        """Queue a trial's run (again after a resume: a queued or running job is left as is)."""
        key = job["key"]
        if key in self._queue or key in self._owner:
            return
        self._ends.pop(key, None)
        self._jobs[key] = job
        if self._hosts and not (self._hosts - set(self._lost)):
            self._ends[key] = {"error": f"no trial host is left ({self._lost_text()})"}
        else:
            self._queue[key] = job
        await self._notify()

    async def hello(self, host: str, parked: list[str], load: dict) -> None:
        """A host (re)started, having loaded the base model (`load`: its seconds, its node) and
        found `parked` slots in its checkpoint. Runs it held before a restart wait for it."""
        self._hosts.add(host)
        self._lost.pop(host, None)
        self._loads.append({"host": host, **load})
        for key in parked:
            self._reserved[key] = host
        for key, owner in list(self._owner.items()):
            if owner == host:  # a restart: the run goes back to the queue, reserved if parked
                del self._owner[key]
                self._queue[key] = self._jobs[key]
                self._queue.move_to_end(key, last=False)
        await self._notify()

    async def claim(self, host: str, free: int, timeout_s: float) -> list[dict] | None:
        """Up to `free` jobs for `host`: first those it holds checkpoints of, then unreserved
        ones in order. Waits up to `timeout_s` for one; None once the board is closed."""

        def mine(key: str) -> bool:
            holder = self._reserved.get(key)
            return holder is None or holder == host or holder in self._lost

        def all_here() -> bool:
            here = len(self._hosts | set(self._lost)) >= self._expected
            return here or time.monotonic() - self._opened > HELLO_WAIT_S

        def ready() -> bool:
            return self._closed or (all_here() and any(mine(k) for k in self._queue))

        await self._wait(ready, timeout_s)
        if self._closed:
            return None
        if not all_here():
            return []
        keys = sorted(
            (k for k in self._queue if mine(k)), key=lambda k: self._reserved.get(k) != host
        )
        taken = []
        for key in keys[:free]:
            taken.append(self._queue.pop(key))
            self._owner[key] = host
        return taken

    async def finished(self, key: str, error: str | None) -> None:
        """A host says run `key` ended (`error`: why it failed, else None)."""
        self._owner.pop(key, None)
        self._reserved.pop(key, None)
        self._ends[key] = {"error": error}
        await self._notify()

    async def wait(self, key: str, timeout_s: float) -> dict | None:
        """How run `key` ended (`{"error": ...}`), waiting up to `timeout_s`; None: not yet."""
        await self._wait(lambda: key in self._ends, timeout_s)
        return self._ends.get(key)

    async def host_error(self, host: str, text: str) -> None:
        """A host's worker died or raised (Ray Train restarts it): every trial with a run
        there records it, as it records a failure of a Train run of its own."""
        for key, owner in self._owner.items():
            if owner == host:
                job = self._jobs[key]
                await self._hub.put.remote(
                    job["trial_id"], job["seed_index"], {"worker_error": text}
                )

    async def host_lost(self, host: str, reason: str) -> None:
        """A host ended for good (its retries spent): its runs fail; with no host left, every
        queued run fails too."""
        self._lost[host] = reason
        for key, owner in list(self._owner.items()):
            if owner == host:
                del self._owner[key]
                self._ends[key] = {"error": f"its trial host {host} failed: {reason}"}
        if not (self._hosts - set(self._lost)):
            for key in list(self._queue):
                del self._queue[key]
                self._ends[key] = {"error": f"no trial host is left ({self._lost_text()})"}
        await self._notify()

    def _lost_text(self) -> str:
        return "; ".join(f"{h}: {r}" for h, r in sorted(self._lost.items()))

    async def abort(self) -> None:
        """The search stopped early (Ctrl-C, an error): hosts return at once, leaving their last
        checkpoints for a resume."""
        self._aborted = self._closed = True
        await self._notify()

    async def aborted(self) -> bool:
        return self._aborted

    async def close(self) -> None:
        """The search is over: idle hosts return."""
        self._closed = True
        await self._notify()

    async def stats(self) -> dict:
        """`base_loads` (how many times a host loaded the base model), their seconds."""
        return {
            "base_loads": len(self._loads),
            "base_load_s": sum(load.get("seconds", 0.0) for load in self._loads),
            "hosts_lost": len(self._lost),
        }


class BoardRef(HubRef):
    """A `HostBoard` by name (pickles as its name, like `HubRef`)."""

    actor_cls = HostBoard


def job_key(trial_id: str, seed: int) -> str:
    """A run's key: its slot's name, its checkpoint's folder (a Train run's name without hosts)."""
    return f"{trial_id}-seed{seed}"


def run_on_host(board: BoardRef, job: dict) -> None:
    """Put a trial's run on the board and wait until a host has run it (in a trial driver).

    Raises:
        SlotError: the run failed on its host (its reason), or its host was lost.
    """
    ray.get(board.submit.remote(job))
    while True:
        end = ray.get(board.wait.remote(job["key"], 5.0))
        if end is not None:
            break
    if end.get("error"):
        raise SlotError(end["error"])


def host_fn_per_worker(config: dict[str, Any]) -> None:
    """A trial host: load the base model once, then train the board's jobs in slots until the
    board closes (`_Host`).

    Args:
        config: `host` (its name), `base` (a `TrainConfig` dict: the model and data
            every slot shares), `capacity` (slots), `board` (`BoardRef`), `hub` (`HubRef`).
    """
    _Host(config).serve()


class _Host:
    """One worker of a trial host. A host of one worker trains its slots alone; a host of
    several (`workers_per_trial > 1`, one GPU each) trains every slot data-parallel, each rank on
    its shard of every slot's batch (`PackedTrainer` under `torch.distributed`). Rank 0 alone
    talks to the board and the trial hub (claims, stop checks, ASHA's verdicts) and shares what
    it learns with the other ranks, so all ranks add, stop and end the same slots in the same
    order; rank 0 alone writes the slots' states.

    Everything a host tells its trials (evaluations, ends) goes out in its Ray Train reports and
    is relayed by the Train controller (`_host_relay`, from rank 0's report), after the report's
    checkpoint is registered and in the order it was reported: a trial never sees an evaluation
    that a restarted host would not resume from, nor a run's end before its last evaluation.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from graphlora.config import MoELoRAConfig
        from graphlora.packed_train import PackedTrainer
        from graphlora.run import TrainConfig

        self.train_cls, self.adapter_cls = TrainConfig, MoELoRAConfig
        self.name, self.capacity = config["host"], config["capacity"]
        self.board, self.hub = config["board"], config["hub"]
        started = time.perf_counter()
        self.trainer = PackedTrainer(self.train_cls.from_dict(config["base"]))
        self.world, self.lead = self.trainer.world, self.trainer.rank == 0
        self.load = {
            "seconds": time.perf_counter() - started,
            "node": ray.get_runtime_context().get_node_id(),
        }
        self.jobs: dict[str, dict] = {}  # slot key -> its job
        self.evaluated: dict[str, tuple[int, dict]] = {}  # slot key -> (step, metrics), this step's
        self.parked: dict[str, Path] = {}  # slot key -> its state in the checkpoint resumed from
        self.tmp = Path()  # the host's scratch folder, while it serves
        self.states: _SlotStates | None = None  # each slot's state as of its last evaluation
        self._polled = 0.0  # when rank 0 last asked whether the search was stopped

    def serve(self) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="graphlora-host-") as tmp:
            self.tmp = Path(tmp)
            self.states = _SlotStates(self.tmp / "states")
            previous = ray.train.get_checkpoint()
            if previous is not None:  # every rank reads it: every rank resumes the slots
                folder = Path(previous.to_directory(str(self.tmp / "resume")))
                manifest = json.loads((folder / MANIFEST).read_text())
                self.parked = {key: folder / key for key in manifest["slots"]}
            if self.lead:
                ray.get(self.board.hello.remote(self.name, list(self.parked), self.load))
            self._polled = time.monotonic()
            while True:
                what, new = self._share(self._next() if self.lead else None)
                if what == "abort":
                    return  # its last checkpoint stays, for --resume
                if what == "end":
                    break
                self._add(new)
                if self.trainer.slots:
                    self._step()
            # Nothing parked for a later start (a search extended with --trials).
            self.states.clear()
            _send([], checkpoint=self._checkpoint())

    def _next(self) -> tuple[str, list[dict]]:
        """Rank 0: what the host does next: ("abort", []), ("end", []) or ("jobs", new jobs)."""
        board, slots = self.board, self.trainer.slots
        if time.monotonic() - self._polled > ABORT_POLL_S:  # the search stopped early?
            self._polled = time.monotonic()
            if ray.get(board.aborted.remote()):
                return "abort", []
        free = self.capacity - len(slots)
        if free <= 0:
            return "jobs", []
        new = ray.get(board.claim.remote(self.name, free, 0.0 if slots else 2.0))
        if new is None and ray.get(board.aborted.remote()):
            return "abort", []
        if new is None and not slots:
            return "end", []
        return "jobs", new or []

    def _share(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _add(self, new: list[dict]) -> None:
        """Start the new jobs in slots, from their states if the host's checkpoint holds them."""
        resumed = []
        for job in new:
            key = job["key"]
            self.jobs[key] = job
            resume = self.parked.pop(key, None)
            self.trainer.add(
                key,
                self.train_cls.from_dict(job["training"]),
                self.adapter_cls.from_dict(job["adapter"]),
                on_eval=self._on_eval_for(key),
                resume_from=resume,
            )
            if resume is not None:
                self.states.keep(key, resume)
                resumed.append(_resumed_message(job, resume))
        if resumed:
            _send(resumed)

    def _on_eval_for(self, key: str):
        def on_eval(step: int, metrics: dict[str, float]) -> bool:
            self.evaluated[key] = (step, metrics)
            return False  # decided after the step, with every slot's verdict at once

        return on_eval

    def _step(self) -> None:
        """One packed step; the evaluations it made and the runs that ended go out."""
        trainer, jobs, evaluated = self.trainer, self.jobs, self.evaluated
        ended = trainer.step()
        for result in ended:
            self.states.drop(result.slot)
        if evaluated:
            # Each slot's state as of its evaluation (as a Train run of its own keeps it);
            # the evaluations go out with the checkpoint that holds them.
            if self.lead:
                for key in evaluated:
                    if key in trainer.slots:
                        self.states.save(trainer, key)
            _send(
                [_message(jobs[k], {**m, "step": step}) for k, (step, m) in evaluated.items()],
                checkpoint=self._checkpoint(),
            )
        stop = self._share(self._verdicts() if self.lead else None) if evaluated else []
        for key in stop:
            self.states.drop(key)
            ended.append(trainer.stop(key))
        evaluated.clear()
        if ended:
            _send(
                [_message(jobs[r.slot], {**r.metrics, "final": 1}) for r in ended if not r.error],
                ended=[(r.slot, _error_text(r.error)) for r in ended],
            )
            for result in ended:
                del jobs[result.slot]

    def _verdicts(self) -> list[str]:
        """Rank 0: ASHA's verdicts on this step's evaluations, awaited all at once; the slots
        it stops (they end as `run_training` ends a run whose on_eval says stop)."""
        keys = [k for k in self.evaluated if k in self.trainer.slots]
        if not keys:
            return []
        jobs = self.jobs
        verdicts = ray.get(
            [
                self.hub.should_stop.remote(
                    jobs[k]["trial_id"],
                    eval_index(
                        self.evaluated[k][0],
                        jobs[k]["training"]["eval_every"],
                        jobs[k]["training"]["max_steps"],
                    ),
                    jobs[k]["verdict_wait_s"],
                )
                for k in keys
            ]
        )
        return [k for k, stop in zip(keys, verdicts, strict=True) if stop]

    def _checkpoint(self) -> Any:
        """Rank 0: a host checkpoint: every slot's state as of its last evaluation, and the
        slots' jobs. Other ranks: None (Ray Train registers rank 0's)."""
        if not self.lead:
            return None
        import ray.train

        folder = self.tmp / "report"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for key, state in self.states.folders.items():
            shutil.copytree(state, folder / key, copy_function=os.link)
        manifest = {"slots": {key: self.jobs[key] for key in self.states.folders}}
        (folder / MANIFEST).write_text(json.dumps(manifest))
        return ray.train.Checkpoint.from_directory(folder)


def _send(
    messages: list[tuple[str, int, dict]], ended: list | None = None, checkpoint: Any = None
) -> None:
    """One Ray Train report: trial messages (trial id, seed index, metrics) and ended runs
    (key, error or None) for the controller to relay, with a host checkpoint or none."""
    import ray.train

    ray.train.report({"relay": messages, "ended": ended or []}, checkpoint=checkpoint)


def _message(job: dict, metrics: dict) -> tuple[str, int, dict]:
    """A trial message about `job`'s run: (trial id, seed index, metrics)."""
    return (job["trial_id"], job["seed_index"], metrics)


def _resumed_message(job: dict, folder: Path) -> tuple[str, int, dict]:
    """A resumed slot says its checkpoint's evaluation again (the trial may not have seen it;
    it drops repeats), marked `resumed` for the trial's recovery log."""
    from graphlora.checkpoint import read_progress

    step, metrics = read_progress(folder)
    return _message(job, {**metrics, "step": step, "resumed": 1})


def _error_text(error: BaseException | None) -> str | None:
    return f"{type(error).__name__}: {error}" if error is not None else None


class _SlotStates:
    """Each slot's training state as of its last evaluation (a `graphlora.checkpoint` folder)."""

    def __init__(self, root: Path) -> None:
        self.root, self.folders, self.count = root, {}, 0

    def save(self, trainer: Any, key: str) -> None:
        self.count += 1
        folder = trainer.save_checkpoint(key, self.root / f"{key}.{self.count}")
        self.keep(key, folder)

    def keep(self, key: str, folder: Path) -> None:
        self.drop(key)  # the older state of the same slot
        self.folders[key] = Path(folder)

    def drop(self, key: str) -> None:
        old = self.folders.pop(key, None)
        if old is not None and old.is_relative_to(self.root):
            shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        for key in list(self.folders):
            self.drop(key)


def _host_relay(board: BoardRef, hub: HubRef, host: str) -> Any:
    """Ray Train callback, in the host's Train controller: relays each report's trial messages
    to the trial hub and its ended runs to the board, in order; and when a worker of the host
    dies or raises, tells every trial with a run there (Ray Train then restarts the host)."""
    from ray.train import UserCallback

    class HostRelay(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            report = metrics[0]
            for trial_id, seed_index, message in report.get("relay", []):
                ray.get(hub.put.remote(trial_id, seed_index, message))
            for key, error in report.get("ended", []):
                ray.get(board.finished.remote(key, error))

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            errors = worker_errors(worker_exceptions, f"host {host} ")
            ray.get(board.host_error.remote(host, errors))

    return HostRelay()


class HostsError(ValueError):
    """The cluster cannot hold one trial host (raised before anything is started)."""


def hosts_for(space: SearchSpace, nodes: list[dict[str, float]] | None = None) -> int:
    """How many trial hosts `space` gets on `nodes` (their resources; default: the connected
    Ray cluster's live nodes), by `Resources.host_count`.

    Raises:
        HostsError: no node holds one host (one line: what a host needs).
    """
    res = space.resources
    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    runs = max(
        space.budget.trials * space.seeds_per_trial,
        space.stability.top_k_configs * space.stability.seeds,
    )
    count = res.host_count(nodes, runs)
    if count < 1:
        need = f"{res.host_cpus():g} CPU" + (
            f" and {res.gpus_per_worker:g} GPU" if res.gpus_per_worker else ""
        )
        workers = res.workers_per_trial
        need = f"{workers} workers of {need}" if workers > 1 else f"{need} on one node"
        raise HostsError(
            f"{space.path}: resources.trials_per_host: a trial host of {res.trials_per_host} "
            f"slots needs {need}, and this Ray cluster's nodes do not hold that; lower "
            "trials_per_host, workers_per_trial or cpus_per_worker, or add a larger node"
        )
    return count


class HostPool:
    """A search's trial hosts: one Ray Train run of `host_fn_per_worker` per host, each fitted
    in a thread of the search driver, named `<search>-host<i>` under the search's storage path
    (so a resumed search's hosts get their checkpoints back). `close` ends them.

    Args:
        space: the search's space (`resources`: hosts, slots, CPUs and GPUs; the base model and
            data its runs share).
        name: the search's name.
        storage_path: where Ray Train keeps the hosts' checkpoints.
        hub: the search's trial hub.
        count: how many hosts (`hosts_for`).
    """

    def __init__(
        self,
        space: SearchSpace,
        name: str,
        storage_path: str,
        hub: HubRef,
        count: int,
    ) -> None:
        self.count = count
        self.capacity = space.resources.trials_per_host
        self.workers = space.resources.workers_per_trial  # data-parallel ranks per host
        self.board = BoardRef.start(f"host-board:{name}", hub, self.count)
        self._space, self._name = space, name
        self._storage, self._hub = storage_path, hub
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start every host (each loads the base model once, then waits for jobs)."""
        res = self._space.resources
        base = self._space.configs({}, self._space.seed)[1]
        resolve_checkpointing(self._space, {}, base)  # as every slot's run has it (`Stage`)
        fast_train_reports()
        malloc = {k: v for k, v in CPU_HOST_MALLOC.items() if k not in os.environ}
        for i in range(self.count):
            host = f"host{i}"
            trainer = seed_trainer(
                {
                    "host": host,
                    "base": base,
                    "capacity": self.capacity,
                    "board": self.board,
                    "hub": self._hub,
                },
                name=f"{self._name}-{host}",
                storage_path=self._storage,
                workers=res.workers_per_trial,
                cpus_per_worker=res.host_cpus(),
                gpus_per_worker=res.gpus_per_worker,
                worker_retries=res.worker_retries,
                callbacks=[_host_relay(self.board, self._hub, host)],
                train_fn=host_fn_per_worker,
                worker_env=None if res.gpus_per_worker else malloc,
            )
            thread = threading.Thread(
                target=self._fit, args=(host, trainer), name=f"trial-{host}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _fit(self, host: str, trainer: Any) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # its retries are spent: its runs fail, the others go on
            ray.get(self.board.host_lost.remote(host, error_line(exc)[:1000]))

    def stats(self) -> dict[str, float]:
        """`hosts`, `base_loads` (base model loads so far) and their seconds (`base_load_s`)."""
        return {"hosts": self.count, **ray.get(self.board.stats.remote())}

    def close(self, *, abort: bool = False, timeout_s: float = 120.0) -> None:
        """End the hosts and the board: once their slots are empty, or (`abort`: the search
        stopped early) at once, each keeping its last checkpoint for a resume."""
        try:
            if abort:  # no verdict will come: a host waiting for one goes on to see the abort
                ray.get([self._hub.release.remote(), self.board.abort.remote()])
            else:
                ray.get(self.board.close.remote())
        except ray.exceptions.RayActorError:
            pass
        for thread in self._threads:
            thread.join(timeout_s)
        try:
            ray.kill(self.board.handle)
        except ValueError:
            pass
