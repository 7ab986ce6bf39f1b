"""The schema of params.yaml: one typed section per stage, unknown keys rejected.

``load_params`` turns every problem into a ``ConfigError`` whose one line names the key path and the reason.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, create_model

from clipmill.components.common.errors import ConfigError
from clipmill.components.common.io import load_yaml, read_text
from clipmill.components.common.params import ProjectParams, RayParams, Section, TrackingParams

DEFAULT_PARAMS = "params.yaml"

# The core library's sections; every other section belongs to a package under components/ (its params.SECTIONS).
CORE_SECTIONS: dict[str, tuple[type[Section], str]] = {
    "project": (ProjectParams, "The seed, and the roots every stage's paths hang from (components/common/layout.py)."),
    "tracking": (TrackingParams, "MLflow: each stage is recorded as a run, with its lineage."),
    "ray": (RayParams, "The Ray cluster of `executor: ray`, the ray distributor and Ray Tune."),
}
# Where the known sections appear in params.yaml, the README and `--help` (pipeline order); others follow by name.
ORDER = ("demo_corpus", "demo_server", "download", "validation", "curate", "filter", "score", "balance", "rewrite",
         "reshard", "report", "train", "continual", "tune", "evaluate", "register", "ablate")


def package_sections() -> dict[str, tuple[type[Section], str]]:
    """Every ``SECTIONS`` declared by a package's ``params`` module under components/: a new stage adds its section
    by declaring it, with nothing to edit here."""
    from clipmill.components.common.packages import package_modules

    found: dict[str, tuple[type[Section], str]] = {}
    modules = [(package, module) for kind in ("params", "cli") for package, module in package_modules(kind).items()]
    for package, module in modules:  # a small stage may declare its section next to its command, in cli.py
        for name, section in getattr(module, "SECTIONS", {}).items():
            if name in found or name in CORE_SECTIONS:
                raise ConfigError(f"components/{package}/{module.__name__.rsplit('.', 1)[-1]}.py: section '{name}' "
                                  "is declared twice")
            found[name] = section
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _build_schema() -> type[Section]:
    sections = {**CORE_SECTIONS, **package_sections()}
    fields = {name: (model, Field(default_factory=model, description=description))
              for name, (model, description) in sections.items()}
    return create_model("Params", __base__=Section, __doc__="The whole of params.yaml; a section left out takes its "
                        "schema defaults.", **fields)


Params = _build_schema()


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
        data = load_yaml(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_params(data, str(path))
