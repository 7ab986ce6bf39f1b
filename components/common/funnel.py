"""The curation funnel's counts as MLflow metrics: every step has input = kept + dropped per reason."""
from __future__ import annotations


def funnel_metrics(summary: dict) -> dict[str, float]:
    """MLflow metric names for a funnel summary (``dropped.<reason>`` with ':' turned into '.').

    ``samples_in`` / ``samples_out`` are the names every stage uses for the pipeline's run summary."""
    return {"input": summary["input"], "kept": summary["kept"],
            "samples_in": summary["input"], "samples_out": summary["kept"],
            **{f"dropped.{k.replace(':', '.')}": v for k, v in summary["dropped"].items()}}
