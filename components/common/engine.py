"""Run a per-sample batch function over a table: in this process, or as Ray Data ``map_batches``.

A batch function takes a pandas DataFrame and returns one (one output row per input row, in order). It is
either a plain function, or a class whose instances are callables: the class is built once per worker
(once here, once per Ray actor), so expensive state such as a model or an automaton is loaded once.
Both engines return the same rows in the same order as the input table.
"""
from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import pandas as pd
from tqdm import tqdm

from .errors import ConfigError
from .log import get_logger, progress_disabled
from .params import RayParams

Engine = Literal["local", "ray"]
ENGINES = ("local", "ray")

log = get_logger("engine")


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

        # Workers of a remote cluster do not have this checkout: ship the package that holds the batch functions.
        ray.init(address=ray_params.address, runtime_env={"py_modules": [components]}, log_to_driver=False)
    else:
        ray.init(num_cpus=ray_params.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _chunks(table: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(table), size):
        yield table.iloc[start:start + size]


def _check_output(out: pd.DataFrame, batch: pd.DataFrame, name: str) -> pd.DataFrame:
    if not isinstance(out, pd.DataFrame) or len(out) != len(batch):
        got = f"{len(out)} rows" if isinstance(out, pd.DataFrame) else type(out).__name__
        raise TypeError(f"batch function {name} must return a DataFrame with one row per input row; "
                        f"got {got} for {len(batch)}")
    return out.reset_index(drop=True)


def _map_local(table: pd.DataFrame, fn: Any, batch_size: int, fn_kwargs: dict,
               fn_constructor_kwargs: dict, desc: str) -> pd.DataFrame:
    udf: Callable[..., pd.DataFrame] = fn(**fn_constructor_kwargs) if inspect.isclass(fn) else fn
    name = getattr(fn, "__qualname__", repr(fn))
    outputs = []
    with tqdm(total=len(table), desc=desc, unit="row", disable=progress_disabled()) as bar:
        for batch in _chunks(table, batch_size):
            outputs.append(_check_output(udf(batch.reset_index(drop=True), **fn_kwargs), batch, name))
            bar.update(len(batch))
    return pd.concat(outputs, ignore_index=True)


def _map_ray(table: pd.DataFrame, fn: Any, batch_size: int, fn_kwargs: dict,
             fn_constructor_kwargs: dict, ray_params: RayParams) -> pd.DataFrame:
    import ray
    import ray.data

    with ray_session(ray_params):
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        # One block per batch so that the batches spread over the cluster.
        dataset = ray.data.from_pandas([chunk.reset_index(drop=True) for chunk in _chunks(table, batch_size)])
        options: dict[str, Any] = {"batch_size": batch_size, "batch_format": "pandas", "fn_kwargs": fn_kwargs or None}
        if inspect.isclass(fn):
            cpus = int(ray.cluster_resources().get("CPU", 1))
            options.update(fn_constructor_kwargs=fn_constructor_kwargs or None, concurrency=(1, max(1, cpus)))
        return dataset.map_batches(fn, **options).to_pandas().reset_index(drop=True)


def map_batches(table: pd.DataFrame, fn: Any, *, engine: Engine, ray_params: RayParams | None = None,
                batch_size: int = 1024, fn_kwargs: dict | None = None,
                fn_constructor_kwargs: dict | None = None, desc: str = "batches") -> pd.DataFrame:
    """Apply ``fn`` to ``table`` in batches of ``batch_size`` rows on ``engine``; returns the concatenated output.

    ``fn`` is a function ``fn(batch, **fn_kwargs)`` or a class built as ``fn(**fn_constructor_kwargs)`` whose
    instances are called like the function. ``ray_params`` says which Ray to use when ``engine`` is ``ray``.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine: unknown engine {engine!r} (expected one of {', '.join(ENGINES)})")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1 (got {batch_size})")
    if table.empty:  # still run the function once, so that the output has its columns
        udf = fn(**(fn_constructor_kwargs or {})) if inspect.isclass(fn) else fn
        return udf(table.reset_index(drop=True), **(fn_kwargs or {}))
    started = time.perf_counter()
    if engine == "local":
        out = _map_local(table, fn, batch_size, fn_kwargs or {}, fn_constructor_kwargs or {}, desc)
    else:
        out = _map_ray(table, fn, batch_size, fn_kwargs or {}, fn_constructor_kwargs or {}, ray_params or RayParams())
    elapsed = time.perf_counter() - started
    log.info("%s: %d rows on %s in %.1f s (%.0f rows/s)", desc, len(table), engine, elapsed,
             len(table) / max(elapsed, 1e-9))
    return out
