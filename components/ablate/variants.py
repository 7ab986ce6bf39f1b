"""The params of an ablation: params.yaml with ``-S key=value`` overrides (as ``dvc exp run -S``) and, only when
asked for, tuned values; both are logged as params of the ablation's parent run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.io import load_yaml, read_json, read_text


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (dotted key, value parsed as YAML: numbers, booleans, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"-S {text!r}: expected section.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"-S {text!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str]) -> dict[str, Any]:
    """Set every ``-S`` override in the raw params mapping ``data``; returns {dotted key: value}."""
    applied = {}
    for text in overrides:
        key, value = parse_override(text)
        node = data
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"-S {text!r}: '{part}' is not a section")
            node = child
        node[last] = value
        applied[key] = value
    return applied


def tuned_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """The tuned values of a tune stage's ``best_params.json`` (they must have been tuned for ``train``)."""
    best = read_json(path)
    if not isinstance(best, dict) or not isinstance(best.get("overrides"), dict):
        raise InputError(path, "expected an object with an 'overrides' mapping", field="overrides")
    if best.get("config_key", "train") != "train":
        raise InputError(path, f"tuned for {best['config_key']!r}, the ablation trains with 'train'",
                         field="config_key")
    return dict(best["overrides"])


def load_variant(params_path: str | os.PathLike, overrides: list[str], best_params: str | None):
    """(params, what was changed): params.yaml, then the ``-S`` overrides, then the tuned values of
    ``best_params`` (only when given) under ``train``. The changes are returned as ``override.<key>`` and
    ``tuned.<key>`` for logging; nothing else is applied."""
    from clipmill.params import parse_params

    path = Path(params_path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        data = load_yaml(read_text(path)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    changed = {f"override.{k}": v for k, v in apply_overrides(data, list(overrides)).items()}
    if best_params:
        tuned = tuned_overrides(best_params)
        data.setdefault("train", {}).update(tuned)
        changed.update({f"tuned.{k}": v for k, v in tuned.items()})
        changed["tuned.source"] = str(best_params)
    source = f"{path}" + (f" with {' '.join('-S ' + o for o in overrides)}" if overrides else "") + \
        (f" and --best-params {best_params}" if best_params else "")
    return parse_params(data, source), changed
