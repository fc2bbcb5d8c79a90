"""Worker processes for the stages of an in-process batch (`csd-asset run --parallel N`, N > 1).

This module imports no Prefect and no MLflow: a worker process holds torch and the stage code only.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import queue
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from flows.pipeline import STAGES, PlannedStage, StageFailed, StageOutcome, execute_stage
from stages.common import StepCallback


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _init_stage_worker(threads: int, log_level: int) -> None:
    """Threads and logging of a worker, then what its first stage would otherwise load on the clock
    (~5-7 s on 2 cores): the stage modules, diffusers' lazily imported models, and the first optimizer
    step's torch._dynamo import."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    for spec in STAGES:
        spec.load()
    from diffusers import UNet2DConditionModel  # noqa: F401  (diffusers resolves its models on first access)

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight])
    weight.sum().backward()
    optimizer.step()


def _started() -> None:
    """The task `StagePool` submits to start a worker (its initializer does the work)."""


def _builtin_error(error: BaseException | None) -> BaseException | None:
    """`error` if it survives pickling, else a builtin exception of the nearest builtin class (so
    `_worth_retrying` still tells a bad input from a transient failure)."""
    if error is None:
        return None
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        base = next(c for c in type(error).__mro__ if c.__module__ == "builtins")
        return base(str(error))


def _stage_in_worker(stage: dict[str, Any], force: bool, steps) -> tuple[str, Any]:
    """Worker side of `StagePool.run`: the stage (its spec by name: specs hold lambdas) with a
    callback that sends `(step, metrics)` to the parent."""
    name = stage.pop("spec")
    planned = PlannedStage(spec=next(s for s in STAGES if s.name == name), **stage)
    try:
        relay = (lambda step, metrics: steps.put((step, metrics))) if steps is not None else None
        return "done", execute_stage(planned, force, callback=relay)
    except StageFailed as error:
        return "failed", (str(error), _builtin_error(error.__cause__))


class StagePool:
    """Worker processes that run the stages of an in-process batch with `max_parallel_assets` > 1.

    Assets in threads of one process share the GIL and torch's intra-op pool, and mostly wait on
    each other (issue 20: 1.13× on 2 cores at `--parallel 2`); `workers` processes with
    `usable_cores() // workers` torch threads each keep every core busy. Prefect task runs and
    MLflow logging stay in the batch's process (the task thread waits on its stage and relays each
    step's metrics to the callback, `Tracker.live`: one queue put per step, small against a step);
    a worker holds only torch and the stage code, and loads the prior once for all the stages it
    runs (on a GPU, one copy per worker)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.threads = max(1, usable_cores() // workers)
        self._context = multiprocessing.get_context("spawn")  # fork would copy Prefect's and MLflow's threads
        self._manager = self._context.Manager()
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        """Workers that start now, not at the first stage: each submitted task starts one while none
        is idle, so they import in parallel with the caller's start-up (a Prefect server, the flow run)."""
        pool = ProcessPoolExecutor(
            self.workers, mp_context=self._context, initializer=_init_stage_worker,
            initargs=(self.threads, logging.getLogger().getEffectiveLevel()),
        )
        for _ in range(self.workers):
            pool.submit(_started)
        return pool

    def run(self, stage: PlannedStage, force: bool, callback: StepCallback = None) -> StageOutcome:
        """`execute_stage(stage, force, callback)` in a worker; raises what it raises."""
        fields = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
        fields["spec"] = stage.spec.name
        # steps cross processes only for a caller that reads them: a queue put per step is IPC
        steps = self._manager.Queue() if callback is not None else None
        with self._lock:
            pool = self._pool
        try:
            future = pool.submit(_stage_in_worker, fields, force, steps)
            while steps is not None:
                try:
                    step, metrics = steps.get(timeout=0.5)
                except queue.Empty:
                    if future.done():
                        break
                    continue
                callback(step, metrics)
            status, value = future.result()
        except BrokenProcessPool:
            # a worker died (killed, out of memory): later stages get a fresh pool; this one's
            # task fails and Prefect's retry resumes it from its checkpoint
            with self._lock:
                if self._pool is pool:
                    self._pool = self._new_pool()
            raise
        if status == "failed":
            message, cause = value
            raise StageFailed(message) from cause
        return value

    def close(self) -> None:
        self._pool.shutdown()
        self._manager.shutdown()
