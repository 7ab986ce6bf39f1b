"""Ray for the curation executor and the sweep: connect to a cluster, or start a local Ray for the duration of a
stage; and what a task asks of the cluster, checked before it is submitted."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .errors import ConfigError
from .params import RayParams


@contextmanager
def ray_session(ray_params: RayParams) -> Iterator[None]:
    """Connect to the Ray cluster at ``ray_params.address`` or start a local Ray with ``num_cpus``.

    A Ray that is already initialised (by a caller or a test) is used as is and left running; one started
    here is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if ray_params.address:
        import components

        # Workers of a remote cluster do not have this checkout: ship the package that holds the curation steps.
        ray.init(address=ray_params.address, runtime_env={"py_modules": [components]}, log_to_driver=False)
    else:
        ray.init(num_cpus=ray_params.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


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
