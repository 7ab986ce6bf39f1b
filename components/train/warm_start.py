"""Where a training run starts: ``warm_start.yaml`` (beside params.yaml, versioned with the code).

``clipmill run <flow> --continual`` writes the current champion into it as a fixed version
(``models:/clipmill/3``) with the loss that model was trained with; ``--from-scratch`` resets it. The train
stage reads it as a DVC params file, so a changed warm start retrains, and a checkout of a past commit
trains from the same model version again. With ``init_from`` set, the ``continual:`` section replaces the
schedule values of ``train:``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from components.common.errors import InputError
from components.common.io import write_text
from components.common.params import Section

from .params import ContinualParams, TrainParams

WARM_START_FILE = "warm_start.yaml"
_HEADER = """\
# Where the train stage starts (a DVC params file of dvc.yaml's train stage).
# Written by `clipmill run <flow> --continual` (the champion, as a fixed version) or `--from-scratch`;
# init_from null: train from scratch with train:; a model: warm start with continual: over train:.
"""


class WarmStart(Section):
    init_from: str | None = Field(None, description="Model to start from (models:/NAME/VERSION, runs:/, a local export); null: from scratch.")
    loss: Literal["clip", "siglip"] | None = Field(None, description="The loss the warm-start model was trained with (kept, so its logit parameters fit).")
    reason: str = Field("", description="Why this warm start (for people reading the file and the run summary).")


def read_warm_start(path: str | os.PathLike | None) -> WarmStart:
    """The warm start in ``path``; none (from scratch) when ``path`` is None."""
    if path is None:
        return WarmStart()
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file (write it with `clipmill run --continual` or `--from-scratch`)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
        return WarmStart.model_validate(doc)
    except yaml.YAMLError as e:
        raise InputError(path, f"not valid YAML ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(path, err["msg"], field=".".join(map(str, err["loc"]))) from None


def write_warm_start(warm: WarmStart, path: str | os.PathLike) -> Path:
    return write_text(_HEADER + yaml.safe_dump(warm.model_dump(), sort_keys=False), path)


def continual_section(train: TrainParams, continual: ContinualParams, warm: WarmStart) -> TrainParams:
    """``train`` as a warm-started run trains: the warm start's model and loss, the continual schedule."""
    overrides = {**continual.model_dump(), "init_from": warm.init_from}
    if warm.loss:
        overrides["loss"] = warm.loss
    return TrainParams.model_validate({**train.model_dump(), **overrides})
