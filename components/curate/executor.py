"""Running one phase of one step over many download shards: in this process, on a local process pool, or as
Ray tasks. The same ``run_task`` does the work everywhere.

A task finds its input (the shard's manifest rows that every earlier step kept, with their columns), reuses
the rows of an earlier output of the same step params (a step's per-sample work is a pure function of the
sample, so only samples new to the step are computed), and writes its output and then its completion marker.

A local pool's worker builds each step it runs and prepares it (a scorer's import and weights take seconds of
CPU), which a small increment would pay for little work. So the driver runs a phase itself when it has a single
unfinished task, a decision phase (one stored map output and the small state per shard) of at most
``DRIVER_DECISIONS`` tasks, and any phase that the last run's timings of the same step and phase say is cheaper
here: n tasks of t seconds each in the driver, plus the step's start-up s unless this process has prepared the
step already (s + n t, or n t), against the workers' start-up plus the tasks shared out (s + n t / workers). The
pool's workers start only for the rest. Where a task runs never changes its output (the driver runs it with a
worker's share of torch threads).

The pool's workers fork from a server process that starts with the stage and imports the steps' modules and
their ``preload`` (torch and open_clip for the scorer: 3-4 s) once, instead of every worker importing them when it
first runs the step. No worker starts before the server has imported them all; until then, the pool's cost of a
phase also holds the rest of that wait (the last run's measure of it, ``server_seconds``), so a small increment's
first steps run here while the server imports, as long as they need no torch. A run whose phases all ran here
(a rerun that only decides, or finds everything done) stops the server if it is still importing, rather than wait
for it on the way out: the pool's shutdown waits on a worker that is starting, and a worker on the server.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.compute as pc

from clipmill.components.common.curation import (
    load_state,
    output_path,
    read_marker,
    rows_fingerprint,
    step_class,
    unit_path,
    write_output,
)
from clipmill.components.common.hashing import hash_obj, params_dump
from clipmill.components.common.log import Progress, get_logger
from clipmill.components.common.params import RayParams
from clipmill.components.common.steps import PoolStep, Step, StepContext, check_output
from clipmill.components.common.storage import location, read_frame, read_table

log = get_logger("curate")

DRIVER_DECISIONS = 64  # decision tasks of one phase that the driver runs itself rather than on the pool


@dataclass(frozen=True)
class UnitTask:
    """One phase (apply | map | decide) of one step on one download shard (unit)."""

    curate_dir: str
    step: str
    params: Any
    context: StepContext
    unit: str
    phase: str
    fingerprint: str                                   # what the finished output's marker must hold
    # (step, its columns, the fingerprint of the per-sample work that made them) of every earlier step, in order
    upstream: tuple[tuple[str, tuple[str, ...], str | None], ...]
    state_hash: str | None = None                      # decide: the combined state it reads

    @property
    def output(self) -> Path:
        return output_path(self.curate_dir, self.step, self.unit, self.phase)

    def done(self) -> bool:
        marker = read_marker(self.output)
        if marker is None or marker.get("fingerprint") != self.fingerprint:
            return False
        if self.phase == "map":  # and its partial, which the combine reads
            partial = read_marker(output_path(self.curate_dir, self.step, self.unit, "partial"))
            return partial is not None and partial.get("fingerprint") == self.fingerprint
        return "kept_uids" in marker and "summary" in marker


_BUILT: dict[str, tuple[str, Step]] = {}
_PREPARED: set[str] = set()  # build keys of the steps this process has prepared (e.g. loaded a scorer)
_STATES: dict[tuple, dict] = {}
# The pool's worker server of this process: when it started, and whether a worker forked from it has run.
_SERVER: dict[str, Any] = {"started": None, "ready": False}


def _build_key(task: UnitTask) -> str:
    return hash_obj({"step": task.step, "params": params_dump(task.params), "context": asdict(task.context)})


def _step(task: UnitTask) -> tuple[str, Step]:
    """The build key and step object of ``task``, built once per process for its params and context (one per
    step kept)."""
    key = _build_key(task)
    if task.step not in _BUILT or _BUILT[task.step][0] != key:
        _BUILT[task.step] = (key, step_class(task.step)(task.params, task.context))
    return _BUILT[task.step]


def _state(task: UnitTask) -> dict:
    """A pool step's combined state, loaded once per process and state."""
    key = (task.curate_dir, task.step, task.state_hash)
    if key not in _STATES:
        _STATES.clear()
        state, stored_hash = load_state(location(task.curate_dir), task.step)
        if stored_hash != task.state_hash:
            raise RuntimeError(f"{task.step}: the stored state changed under a running task")
        _STATES[key] = state
    return _STATES[key]


def step_input(curate_dir, unit: str, needs: tuple[str, ...],
               upstream: tuple[tuple[str, tuple[str, ...], str | None], ...]) -> pd.DataFrame:
    """The unit's rows that every earlier step kept: uid, the manifest columns ``needs`` and earlier columns.

    A step decides exactly the samples that every step before it kept, so the last earlier step's kept uids are
    the samples every one of them kept: only that output and those of steps that add columns are read (as Arrow
    tables, filtered and joined before the one conversion to pandas).
    """
    rows = read_table(unit_path(curate_dir, unit), columns=["uid", *[c for c in needs if c != "uid"]])
    if not upstream:
        return rows.to_pandas()
    last, last_columns, _ = upstream[-1]
    decided = read_table(output_path(curate_dir, last, unit), columns=["uid", "keep", *last_columns])
    decided = decided.filter(decided.column("keep"))
    uid_type = rows.schema.field("uid").type  # an output of no rows was written with a null-typed uid column
    rows = rows.filter(pc.is_in(rows.column("uid"), value_set=decided.column("uid").cast(uid_type)))
    for name, columns, _ in upstream:
        if not columns:
            continue
        table = decided if name == last else read_table(output_path(curate_dir, name, unit), columns=["uid", *columns])
        positions = pc.index_in(rows.column("uid"), value_set=table.column("uid").cast(uid_type))
        for column in columns:
            rows = rows.append_column(column, table.column(column).take(positions))
    return rows.to_pandas()


def _reuse(task: UnitTask, batch: pd.DataFrame, compute, params_fp: str) -> pd.DataFrame:
    """``compute`` on the samples of ``batch`` that an earlier output with the same params does not hold."""
    marker = read_marker(task.output)
    if marker is None or marker.get("params") != params_fp or batch.empty:
        return compute(batch)
    previous = read_frame(task.output)
    previous = previous[previous["uid"].isin(batch["uid"])]
    new = batch[~batch["uid"].isin(previous["uid"])].reset_index(drop=True)
    parts = [previous] + ([compute(new)] if len(new) else [])
    merged = pd.concat(parts, ignore_index=True).set_index("uid").reindex(batch["uid"]).reset_index()
    return merged


def _counts(out: pd.DataFrame) -> dict:
    keep = out["keep"].to_numpy(dtype=bool)
    dropped = Counter(str(r) for r in out["reason"].to_numpy()[~keep])
    return {"input": int(len(out)), "kept": int(keep.sum()), "dropped": dict(sorted(dropped.items()))}


def run_task(task: UnitTask) -> dict:
    """Do ``task`` unless its output is already finished; returns the output's marker with the ``seconds`` the work
    took (0 when it was finished before; seconds are not stored in the marker: outputs do not time a run).

    The marker of a decision (apply, decide) also holds fingerprints of what later steps read from it: ``kept``
    (the uids it kept) and ``kept_columns`` (its columns on those uids; None for a step without columns), and the
    step's ``shard_summary`` of it (``summary``), which the step's summary adds up without reading the shard again.
    """
    if task.done():
        return {**read_marker(task.output), "seconds": 0.0, "build_seconds": 0.0}
    started = time.perf_counter()
    key, step = _step(task)  # built once per process: its start-up (e.g. loading a scorer) is not the shard's work
    if task.phase != "decide":
        step.prepare()
        _PREPARED.add(key)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cls = type(step)
    curate_dir = location(task.curate_dir)
    # A sample's earlier output is reused only under the same params and the same per-sample work upstream (the
    # columns the step reads: rewrite's matched entries change with balance's metadata).
    params_fp = hash_obj([cls.fingerprint(task.params, task.context, task.phase),
                          [fp for *_, fp in task.upstream if fp is not None]])
    if task.phase == "decide":
        assert isinstance(step, PoolStep)
        mapped = read_frame(output_path(curate_dir, task.step, task.unit, "map"))
        out = check_output(cls, step.decide(mapped, _state(task)), mapped, [*cls.columns, *cls.extra_columns])
        counts = _counts(out)
    else:
        batch = step_input(curate_dir, task.unit, cls.needs, task.upstream)
        if task.phase == "map":
            assert isinstance(step, PoolStep)
            out = _reuse(task, batch, step.map, params_fp)
            if len(out) != len(batch) or list(out["uid"]) != list(batch["uid"]):
                raise TypeError(f"curation step {cls.name!r}: map must return one row per input sample, in order")
            partial = step.partial(out)
            write_output(partial, output_path(curate_dir, task.step, task.unit, "partial"),
                         {"fingerprint": task.fingerprint})
            counts = {"input": int(len(out))}
        else:
            out = check_output(cls, _reuse(task, batch, step.apply, params_fp), batch,
                               [*cls.columns, *cls.extra_columns])
            counts = _counts(out)
    if task.phase != "map":
        kept = out[out["keep"].astype(bool)]
        counts["kept_uids"] = rows_fingerprint(kept[["uid"]].reset_index(drop=True))
        counts["kept_columns"] = (rows_fingerprint(kept[["uid", *cls.columns]].reset_index(drop=True))
                                  if cls.columns else None)
        counts["summary"] = cls.shard_summary(task.params, out)
    marker = {"fingerprint": task.fingerprint, "params": params_fp, **counts}
    write_output(out, task.output, marker)
    return {**marker, "seconds": time.perf_counter() - started, "build_seconds": build_seconds}


class Executor:
    """Runs tasks in this process (``workers`` 0 or 1), on one local process pool kept for every phase, or as
    Ray tasks; the same ``run_task`` everywhere."""

    def __init__(self, kind: str, workers: int, ray_params: RayParams, preload: Sequence[str] = (),
                 server_seconds: float | None = None):
        self.kind, self.workers, self.ray_params = kind, workers, ray_params
        self.preload = list(preload)  # modules the local pool's workers import before their first task
        self.server_seconds = server_seconds  # the last run's seconds from the server's start to its first worker
        self.measured_server_seconds: float | None = None  # this run's
        self._stack = ExitStack()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Executor:
        if self.kind == "ray":
            from clipmill.components.common.engine import ray_session

            self._stack.enter_context(ray_session(self.ray_params))
        elif self.workers > 1:
            # forked from a server that imported ``preload`` and nothing else (no torch threads, no Ray state);
            # each worker builds a step once.
            context = start_worker_server(self.preload, self.workers)
            self._pool = self._stack.enter_context(ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=_worker_threads,
                initargs=(self.workers,)))
            if not _SERVER["ready"]:
                threading.Thread(target=self._server_probe, args=(context,), daemon=True).start()
        return self

    def _server_probe(self, context: BaseContext) -> None:
        """Fork a process from the server (it waits for the server's imports) and say when it could. Not one of the
        pool's workers: a pool starting a worker holds its own lock until the server answers, and its shutdown would
        wait on that (a run whose phases all ran here would end only once the server had imported everything)."""
        started = _SERVER["started"]
        try:
            probe = context.Process(target=int, daemon=True)
            probe.start()
        except Exception:  # the server was stopped (the run ended first); this only weighs where phases run
            return
        if not _SERVER["ready"] and started is not None and _SERVER["started"] == started:
            self.measured_server_seconds = time.perf_counter() - started  # measured once per server
            _SERVER["ready"] = True
            try:  # the server answers at once now: a worker starts before a phase needs it
                self._pool.submit(int)
            except Exception:  # the pool was shut down meanwhile (the run ended)
                pass
        probe.join()

    def _server_wait(self, step: type[Step]) -> float:
        """Seconds a phase sent to the pool now would wait for the server's imports (the last run's measure of them,
        less the time since the server started); 0 when a worker runs, without a measure, or for a step that runs
        torch (the driver would import it too)."""
        if _SERVER["ready"] or not self.server_seconds or step.uses_torch:
            return 0.0
        return max(0.0, self.server_seconds - (time.perf_counter() - _SERVER["started"]))

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            if not _SERVER["ready"]:  # no worker has run: the server's imports are not waited for
                stop_worker_server()
            _stop_workers(self._pool)
        self._stack.close()

    def in_driver(self, tasks: list[UnitTask], previous: dict | None = None) -> bool:
        """Whether the driver runs these unfinished tasks itself (see the module docstring); ``previous`` is the
        last run's timing of the same step and phase (``Executor.run``'s result), when there is one."""
        if self._pool is None or len(tasks) <= 1 or (tasks[0].phase == "decide" and len(tasks) <= DRIVER_DECISIONS):
            return True
        if not previous or not previous.get("ran") or previous.get("worker_startup_seconds") is None:
            return False
        per_task = previous["task_seconds"] / previous["ran"]
        n, startup = len(tasks), previous["worker_startup_seconds"]
        here = 0.0 if _build_key(tasks[0]) in _PREPARED else startup  # the driver pays it too, once
        wait = self._server_wait(step_class(tasks[0].step))
        return here + n * per_task <= wait + startup + n * per_task / self.workers

    def _local(self, tasks: list[UnitTask], bar: Progress, timing: dict, previous: dict | None) -> None:
        def done(result: dict) -> None:
            timing["task_seconds"] += result["seconds"]
            bar.update(1, samples=result.get("input", 0))

        if self.in_driver(tasks, previous):
            timing["where"] = "driver"
            # decisions read stored outputs: only map and apply run the step's model
            uses_torch = step_class(tasks[0].step).uses_torch and tasks[0].phase != "decide"
            with _threads_like_a_worker(self.workers if self._pool is not None else 1, uses_torch):
                for task in tasks:
                    done(run_task(task))
            return
        timing["where"] = "pool"
        startup = 0.0
        pending = {self._pool.submit(run_task, task) for task in tasks}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    result = future.result()  # re-raises a worker's error here, with its message
                    startup = max(startup, result["build_seconds"])
                    done(result)
            # what a worker paid to import and build the step: the cost of sending this phase to the pool
            timing["worker_startup_seconds"] = startup
        finally:
            if pending:  # a task failed: the tasks not started never will, and the workers stop now
                _stop_workers(self._pool, drop_pending=True)

    def _ray(self, tasks: list[UnitTask], resources: dict, bar: Progress) -> float:
        import ray

        from clipmill.components.common.engine import ray_options

        options = ray_options(resources, ray.cluster_resources(), f"curate: step {tasks[0].step}")
        remote = ray.remote(**options)(run_task)
        pending = [remote.remote(task) for task in tasks]
        seconds = 0.0
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            results = ray.get(finished)
            seconds += sum(result["seconds"] for result in results)
            bar.update(len(finished), samples=sum(result.get("input", 0) for result in results))
        return seconds

    def run(self, tasks: list[UnitTask], resources: dict | None = None, previous: dict | None = None) -> dict:
        """Run the unfinished ``tasks`` (all of one step and phase); returns how many ran, the seconds their work
        took (summed over the tasks), the phase's wall seconds, where it ran (driver, pool or ray) and, for the
        local executor, the seconds a pool worker took to import and build the step (measured when the pool ran the
        phase, else ``previous``'s: the last run's result for the same step and phase, which ``in_driver`` reads)."""
        todo = [t for t in tasks if not t.done()]
        timing = {"shards": len(tasks), "ran": len(todo), "task_seconds": 0.0, "wall_seconds": 0.0}
        if self.kind == "local" and previous and previous.get("worker_startup_seconds") is not None:
            timing["worker_startup_seconds"] = previous["worker_startup_seconds"]
        if not todo:
            if tasks:
                log.info("%s:%s: all %d shards finished earlier", tasks[0].step, tasks[0].phase, len(tasks))
            return timing
        label = f"{tasks[0].step}:{tasks[0].phase}"
        started = time.perf_counter()
        with Progress(f"curate {label}", len(todo), "shards") as bar:
            if self.kind == "ray":
                timing["where"] = "ray"
                timing["task_seconds"] = self._ray(todo, resources or {"num_cpus": 1}, bar)
            else:
                self._local(todo, bar, timing, previous)
        timing["wall_seconds"] = time.perf_counter() - started
        log.info("%s: %d of %d shards in %.1f s (%d finished earlier; %s)", label, len(todo), len(tasks),
                 timing["wall_seconds"], len(tasks) - len(todo), timing["where"])
        return timing


def _stop_workers(pool: ProcessPoolExecutor, drop_pending: bool = False) -> None:
    """End the pool's workers now rather than let each unload its modules on exit (torch's take most of a second,
    on every curation run). After a normal run every task has finished. After an error a task may still be running:
    it ends as in a killed run, and since a task writes its output atomically and then its marker, the rerun redoes
    it. ``drop_pending`` (after an error): the tasks not started are dropped by the pool's own thread (shut down
    with ``cancel_futures``; cancelling them here would have that thread fail on them once the workers stop)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())  # shutting down forgets them
    if drop_pending:
        pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.terminate()


def _thread_share(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def start_worker_server(preload: list[str], workers: int) -> BaseContext:
    """The forkserver context of the pool, its server started now unless it runs already (the stage starts it
    before its own work; the executor's pool uses it): it imports ``preload`` in the background with a worker's
    share of threads for torch and BLAS in its environment (they read it when they load)."""
    from clipmill.components.common.engine import start_forkserver

    if _SERVER["started"] is None:
        _SERVER["started"] = time.perf_counter()
    return start_forkserver(preload, {name: str(_thread_share(workers)) for name in _THREAD_VARIABLES})


def stop_worker_server() -> None:
    """Stop the pool's worker server while it imports (a run whose phases all ran in the driver ends now, not once
    the server has imported torch and open_clip for nothing); the next pool of this process starts a new one."""
    from clipmill.components.common.engine import stop_forkserver

    if stop_forkserver():
        log.debug("curate: the worker server was not needed; stopped")
    _SERVER.update(started=None, ready=False)


def _worker_threads(workers: int) -> None:
    """Each pool worker gets its share of the cores for torch and BLAS: in its environment for libraries it has not
    loaded yet, and torch's own setting where the server imported torch already."""
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, str(_thread_share(workers)))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@contextmanager
def _threads_like_a_worker(workers: int, uses_torch: bool = False) -> Iterator[None]:
    """Tasks the driver runs use a worker's share of torch threads, as the pool's workers would: a model's
    outputs then do not depend on where its task ran. Torch is imported here for a step that ``uses_torch`` (the
    driver does not import it otherwise), so the setting is torch's own."""
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    torch = sys.modules.get("torch")
    if torch is None and uses_torch:
        import torch
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_thread_share(workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)
