"""The schema of params.yaml: one typed section per stage, unknown keys rejected.

``load_params`` turns every problem into a ``ConfigError`` whose one line names the key path and the reason.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from components.common.errors import ConfigError
from components.common.params import ProjectParams, RayParams, Section, TrackingParams
from components.demo_corpus.params import DemoCorpusParams, DemoServerParams
from components.download.params import DownloadParams
from components.validate.params import ValidationParams
from components.ablate.params import AblateParams
from components.balance.params import BalanceParams
from components.curate.params import CurateParams
from components.filter.params import FilterParams
from components.score.params import ScoreParams
from components.report.params import ReportParams
from components.evaluate.params import EvaluateParams
from components.register.params import RegisterParams
from components.reshard.params import ReshardParams
from components.rewrite.params import RewriteParams
from components.train.params import ContinualParams, TrainParams
from components.tune.params import TuneParams

DEFAULT_PARAMS = "params.yaml"


class Params(Section):
    project: ProjectParams = Field(default_factory=ProjectParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    ray: RayParams = Field(default_factory=RayParams)
    demo_corpus: DemoCorpusParams = Field(default_factory=DemoCorpusParams)
    demo_server: DemoServerParams = Field(default_factory=DemoServerParams)
    download: DownloadParams = Field(default_factory=DownloadParams)
    validation: ValidationParams = Field(default_factory=ValidationParams)
    curate: CurateParams = Field(default_factory=CurateParams)
    filter: FilterParams = Field(default_factory=FilterParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    balance: BalanceParams = Field(default_factory=BalanceParams)
    rewrite: RewriteParams = Field(default_factory=RewriteParams)
    reshard: ReshardParams = Field(default_factory=ReshardParams)
    report: ReportParams = Field(default_factory=ReportParams)
    train: TrainParams = Field(default_factory=TrainParams)
    continual: ContinualParams = Field(default_factory=ContinualParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    register: RegisterParams = Field(default_factory=RegisterParams)
    ablate: AblateParams = Field(default_factory=AblateParams)


def _model_at(loc: tuple) -> Any:
    """The pydantic model class that owns the location ``loc`` (for 'did you mean' hints)."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return model


def _describe(err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    path = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        model = _model_at(tuple(err["loc"]))
        known = list(getattr(model, "model_fields", {}))
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
        return f"{path}: unknown key{hint}"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {err['msg'][0].lower()}{err['msg'][1:]}{got_s}"


def parse_params(data: Any, source: str = DEFAULT_PARAMS) -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_params(data, str(path))
