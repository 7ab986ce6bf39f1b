"""Ray for the curation executor, the sweep and the download: connect to a cluster, or start a local Ray for the
duration of a stage; and what a task asks of the cluster, checked before it is submitted. And the server that local
pools fork their workers from."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .params import RayParams


def start_forkserver(preload: list[str], environment: dict[str, str] | None = None) -> BaseContext:
    """The forkserver context, its server started now (unless it runs already) importing ``preload`` in the
    background, so that each worker forked from it starts with those modules imported rather than importing them
    itself. ``environment`` holds variables the server sees when it starts (unless they are set already; this
    process's are left as they were), such as the thread counts that torch and BLAS read when they load.

    A process has one server: whoever starts it first fixes its imports and environment; a later call gets the
    running one."""
    from multiprocessing import forkserver

    context = get_context("forkserver")
    context.set_forkserver_preload(preload)  # read when the server starts
    saved = {name: os.environ.get(name) for name in environment or {}}
    try:
        for name, value in (environment or {}).items():
            os.environ.setdefault(name, value)
        forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return context


def stop_forkserver() -> bool:
    """Kill this process's forkserver, if it runs: a server still importing its ``preload`` would otherwise hold up
    the end of a pool that never needed a worker (the pool's first worker waits on it, and the pool's shutdown on
    that worker). A worker forked from it earlier runs on; a later ``start_forkserver`` starts a new one. Returns
    whether one was running."""
    import signal
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # the stdlib keeps no public handle on it
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        # Until it has exited, the next ``start_forkserver`` would find it alive and send it a worker to start: it
        # is waited for, and left to be reaped there (which then starts a new one).
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except (ProcessLookupError, ChildProcessError):
        return False
    return True


@contextmanager
def ray_session(ray_params: RayParams, *, env_vars: dict[str, str] | None = None, ship_code: bool = True,
                object_store_mb: int | None = None, worker_logs: bool = False) -> Iterator[None]:
    """Connect to the Ray cluster at ``ray_params.address`` or start a local Ray with ``num_cpus``.

    A Ray that is already initialised (by a caller or a test) is used as is and left running; one started
    here is shut down on exit. The options are those of ``ray_init_args``.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(**ray_init_args(ray_params, env_vars=env_vars, ship_code=ship_code, object_store_mb=object_store_mb,
                             worker_logs=worker_logs))
    try:
        yield
    finally:
        ray.shutdown()


def ray_init_args(ray_params: RayParams, *, env_vars: dict[str, str] | None = None, ship_code: bool = True,
                  object_store_mb: int | None = None, worker_logs: bool = False) -> dict[str, Any]:
    """The ``ray.init`` arguments of a session: the cluster at ``ray_params.address`` (with this checkout's
    ``clipmill`` package shipped when ``ship_code``: a remote cluster's workers do not have it) or a local Ray
    of ``num_cpus`` (and ``object_store_mb`` MiB of object store, when set); ``env_vars`` set in every worker;
    workers' output echoed to the driver only with ``worker_logs``."""
    runtime_env: dict[str, Any] = {"env_vars": dict(env_vars)} if env_vars else {}
    if ray_params.address:
        args: dict[str, Any] = {"address": ray_params.address}
        if ship_code:
            runtime_env["py_modules"] = [shipped_code()]
    else:
        args = {"num_cpus": ray_params.num_cpus, "include_dashboard": False}
        if object_store_mb:
            args["object_store_memory"] = object_store_mb * 2**20
    if runtime_env:
        args["runtime_env"] = runtime_env
    return {**args, "log_to_driver": worker_logs}


def shipped_code() -> str:
    """A directory laid out as the installed ``clipmill`` package (``clipmill/`` with ``components/`` and
    ``pipelines/`` inside), for Ray to ship to a remote cluster's workers: a checkout maps the top-level folders
    into the namespace, and Ray ships directories as they lie. Copied once per process."""
    global _SHIPPED
    if _SHIPPED is None:
        import clipmill
        from clipmill import components, pipelines

        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        dest = Path(tempfile.mkdtemp(prefix="clipmill-code-")) / "clipmill"
        shutil.copytree(Path(clipmill.__file__).parent, dest, ignore=ignore)
        for package in (components, pipelines):
            shutil.copytree(Path(package.__file__).parent, dest / package.__name__.rsplit(".", 1)[-1], ignore=ignore)
        _SHIPPED = str(dest)
    return _SHIPPED


_SHIPPED: str | None = None


# A step's ``num_gpus`` may be this: one GPU per task when the Ray cluster has GPUs, none otherwise (device auto).
GPU_IF_AVAILABLE = "auto"
# Ray's names for the amounts a task or a trial asks for (ray.remote options / Tune resources -> cluster keys).
_CLUSTER_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "cpu": "CPU", "gpu": "GPU", "memory": "memory"}


def resolve_gpus(amount: float | str, cluster: dict[str, float]) -> float:
    """``amount`` of GPUs, with ``GPU_IF_AVAILABLE`` resolved against the cluster's resources."""
    if amount == GPU_IF_AVAILABLE:
        return 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    return float(amount)


def check_fits(resources: dict[str, float], cluster: dict[str, float], what: str) -> None:
    """ConfigError when one task of ``what`` asks for more of a resource than the whole cluster has: Ray would
    keep it pending for ever (an autoscaling cluster must have a node of that shape up when the stage starts)."""
    for key, amount in resources.items():
        name = _CLUSTER_KEYS.get(key, key)
        have = cluster.get(name, 0.0)
        if amount > have:
            raise ConfigError(f"{what}: one task asks for {key}={amount:g} but the Ray cluster has {name}={have:g} "
                              "in all, so it would wait for ever")


def ray_options(resources: dict, cluster: dict[str, float], what: str) -> dict[str, float]:
    """The ``ray.remote`` options of a task of ``what`` that asks for ``resources`` (a step's ``resources()``),
    checked against ``cluster`` (``ray.cluster_resources()``): a ``num_gpus`` of ``GPU_IF_AVAILABLE`` becomes 1
    on a cluster with GPUs and is left out on one without."""
    options = dict(resources)
    if "num_gpus" in options:
        options["num_gpus"] = resolve_gpus(options["num_gpus"], cluster)
        if not options["num_gpus"]:
            del options["num_gpus"]
    check_fits(options, cluster, what)
    return options
