"""Ray for the curation executor: connect to a cluster, or start a local Ray for the duration of a stage."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
