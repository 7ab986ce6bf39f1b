"""The curation ablation as a Prefect flow: each arm's shards and each (arm, seed) training run are tasks.

The flow runs ``components.ablate.ablation.ablate`` (the same code as ``clipmill ablate``); ``clipmill ablate
--prefect`` starts it.
"""
from __future__ import annotations

from typing import Any, Callable

from prefect import flow, task
from prefect.cache_policies import NONE


def _as_task(fn: Callable, name: str, *args) -> Any:
    return task(fn, name=fn.__name__, task_run_name=name, cache_policy=NONE)(*args)


@flow(name="clipmill-ablate", log_prints=True)
def ablation_flow(params, inputs) -> dict:
    """``ablate(params, inputs)`` with each unit of work as a Prefect task."""
    from components.ablate.ablation import ablate

    return ablate(params, inputs, call=_as_task)
