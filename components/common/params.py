"""Typed params shared by all stages, and the base class every section derives from.

Each stage keeps its own section model in ``components/<stage>/params.py``; ``clipmill.params``
assembles them into the schema of ``params.yaml``.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ProjectParams(Section):
    seed: int = Field(0, ge=0, description="Master seed; every stage derives its own from it.")
    data_dir: str = Field(
        "data",
        description="Root of the DVC-tracked stage outputs: dvc.yaml and the stage commands' path defaults follow it.",
    )
    reports_dir: str = Field("reports", description="Where HTML/PNG reports and run_summary.md are written.")


class TrackingParams(Section):
    experiment: str = Field("clipmill", min_length=1, description="MLflow experiment name.")
    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins over it.",
    )
    enabled: bool = Field(True, description="Record each stage as an MLflow run.")


class RayParams(Section):
    address: str | None = Field(
        None,
        description="Ray cluster address (ray://host:10001 or host:6379); null starts a local Ray.",
    )
    num_cpus: int = Field(2, ge=1, description="CPUs of the local Ray started when address is null.")


def section_at(params: BaseModel, key: str) -> object:
    """The section at dotted ``key`` of loaded params (``score.bootstrap``); ConfigError naming the missing part."""
    from .errors import ConfigError

    section: object = params
    for part in key.split("."):
        if part not in getattr(type(section), "model_fields", {}):
            raise ConfigError(f"params: no section '{key}' ('{part}' is not a key there)")
        section = getattr(section, part)
    return section
