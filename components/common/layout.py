"""Where every stage reads and writes: one declaration, rooted at ``project.data_dir`` and ``project.reports_dir``.

The stage CLIs take their path defaults from here (``layout(params).download.manifest``) and dvc.yaml's paths are
checked against it (tests/test_layout.py), so moving ``project.data_dir`` moves the whole pipeline with it.
Paths are strings joined with ``/``: a root may be an object-storage URL (``s3://bucket/data``).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Under project.data_dir: a group (a mapping) is a directory named by its key; a string is a file or directory in it.
DATA: dict[str, Any] = {
    "crawl": {"urls": "urls.parquet", "web": "web", "ground_truth": "ground_truth.parquet"},
    "eval": {},
    "trusted": {},
    "download": {"lists": "lists", "shards": "shards", "manifest": "manifest.parquet", "summary": "summary.json",
                 "run": "run.json"},
    "validation": {"download": "download.json", "curate": "curate.json", "curated": "curated.json"},
    "scorer": {"model": "model", "run": "run.json", "checkpoints": "checkpoints", "metrics": "metrics.json"},
    "curate": {"units": "units", "steps": "steps", "summary": "summary.json"},
    "curated": {},
    "tune": {"best_params": "best_params.json", "trials": "trials.json", "run": "run.json"},
    "train": {"model": "model", "run": "run.json", "checkpoints": "checkpoints", "metrics": "metrics.json"},
    "evaluate": {"metrics": "metrics.json", "per_class": "per_class.csv"},
    "register": {"registration": "registration.json"},
}

# Under project.reports_dir.
REPORTS: dict[str, Any] = {
    "validation": {"download": "download", "curate": "curate", "curated": "curated"},
    "curation": {},
    "evaluation": {},
    "promotion": "promotion.md",
}


class PathGroup:
    """A directory and the named paths declared in it: ``group.name`` is a path string, or a nested group."""

    def __init__(self, root: str, spec: Mapping[str, Any]) -> None:
        self.dir = root.rstrip("/") or root
        self._spec = spec

    def __getattr__(self, name: str) -> Any:
        spec = self.__dict__.get("_spec", {})
        if name not in spec:
            raise AttributeError(f"layout: no path '{name}' under {self.__dict__.get('dir')!r}")
        entry = spec[name]
        if isinstance(entry, Mapping):
            return PathGroup(f"{self.dir}/{name}", entry)
        return f"{self.dir}/{entry}"


class Layout(PathGroup):
    """The data tree (``layout.download.manifest``) and, as ``layout.reports``, the reports tree."""

    def __init__(self, data_dir: str, reports_dir: str) -> None:
        stages()  # the stage packages' own directories join DATA and REPORTS
        super().__init__(data_dir, DATA)
        self.reports = PathGroup(reports_dir, REPORTS)

    def resolve(self, key: str) -> str:
        """The path at dotted ``key``: ``download.manifest``, ``curated`` (a group: its directory),
        ``reports.validation.download``."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node.dir if isinstance(node, PathGroup) else node


def layout(params: Any = None) -> Layout:
    """The layout of loaded params (their ``project`` section); the schema defaults when ``params`` is None."""
    if params is None:
        from .params import ProjectParams

        project = ProjectParams()
    else:
        project = getattr(params, "project", params)
    return Layout(project.data_dir, project.reports_dir)


@dataclass(frozen=True)
class StagePaths:
    """One stage's path arguments (CLI option -> layout key), and the layout keys it reads and writes.

    ``deps``/``outs`` are what dvc.yaml lists for the stage (its metrics and plots count as outs); ``passed`` are
    path options dvc.yaml passes that have no default on the CLI (leaving them out means "none"); ``dvc`` is
    False for a command that is not a dvc.yaml stage.
    """

    options: Mapping[str, str]
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    passed: Mapping[str, str] = field(default_factory=dict)
    dvc: bool = True


_DOWNLOAD_OUTS = ("download.lists", "download.shards", "download.manifest", "download.summary", "download.run")
_CURATE_INPUTS = {"manifest": "download.manifest", "shards": "download.shards", "bootstrap-model": "scorer.model"}

STAGES: dict[str, StagePaths] = {
    "demo_corpus": StagePaths({"crawl-out": "crawl", "eval-out": "eval", "trusted-out": "trusted"},
                              outs=("crawl", "eval", "trusted")),
    "download": StagePaths({"out": "download"}, deps=("crawl.web",), outs=_DOWNLOAD_OUTS),
    "validate_download": StagePaths(
        {"manifest": "download.manifest", "out": "validation", "reports": "reports.validation"},
        deps=("download.manifest",), outs=("validation.download", "reports.validation.download")),
    "score_bootstrap": StagePaths({"shards": "trusted", "out": "scorer"}, deps=("trusted", "eval"),
                                  outs=("scorer.model", "scorer.run", "scorer.checkpoints", "scorer.metrics")),
    "curate": StagePaths(
        {**_CURATE_INPUTS, "out": "curate"},
        deps=("download.manifest", "download.shards", "validation.download", "scorer.model"),
        outs=("curate.units", "curate.steps", "curate.summary")),
    "validate_curate": StagePaths(
        {"curate": "curate", "out": "validation", "reports": "reports.validation"},
        deps=("curate.steps",), outs=("validation.curate", "reports.validation.curate")),
    "reshard": StagePaths({"curate": "curate", "shards": "download.shards", "out": "curated"},
                          deps=("download.shards", "curate.units", "curate.steps", "validation.curate"),
                          outs=("curated",)),
    "validate_curated": StagePaths(
        {"curated": "curated", "out": "validation", "reports": "reports.validation"},
        deps=("curated",), outs=("validation.curated", "reports.validation.curated")),
    "report": StagePaths(
        {"manifest": "download.manifest", "download-summary": "download.summary", "shards": "download.shards",
         "curate": "curate", "curated": "curated", "validation": "validation", "out": "reports.curation"},
        deps=("crawl.ground_truth", "download.manifest", "download.summary", "download.shards", "curate.units",
              "curate.steps", "curated", "validation.curate", "validation.curated"),
        outs=("reports.curation",), passed={"ground-truth": "crawl.ground_truth"}),
    "tune": StagePaths({"shards": "curated", "eval-dir": "eval", "out": "tune"}, deps=("curated", "eval"),
                       outs=("tune.best_params", "tune.trials", "tune.run")),
    "train": StagePaths({"shards": "curated", "eval-dir": "eval", "out": "train", "best-params": "tune.best_params"},
                        deps=("curated", "eval", "tune.best_params"),
                        outs=("train.model", "train.run", "train.checkpoints", "train.metrics")),
    "evaluate": StagePaths({"model": "train.model", "eval-dir": "eval", "out": "evaluate",
                            "reports": "reports.evaluation"},
                           deps=("train.model", "eval", "crawl.ground_truth"),
                           outs=("evaluate.metrics", "evaluate.per_class", "reports.evaluation")),
    "register": StagePaths(
        {"model": "train.model", "metrics": "evaluate.metrics", "train-run": "train.run", "curated": "curated",
         "download-summary": "download.summary", "eval-dir": "eval", "out": "register", "reports": "reports"},
        deps=("train.model", "train.run", "download.summary", "evaluate.metrics", "curated", "eval"),
        outs=("register.registration", "reports.promotion")),
    "ablate": StagePaths({**_CURATE_INPUTS, "curate": "curate", "eval-dir": "eval"}, dvc=False),
}


_declarations_loaded = False


def stages() -> dict[str, StagePaths]:
    """Every stage's paths: those above, and those a stage package declares next to its command (``PATHS`` in
    its ``cli.py``, with its own directories in ``DATA`` / ``REPORTS``), so that a new stage edits no list here."""
    global _declarations_loaded
    if not _declarations_loaded:
        _declarations_loaded = True
        from .packages import package_modules

        for name, module in package_modules("cli").items():
            if hasattr(module, "PATHS"):
                STAGES[name] = module.PATHS
                DATA.update(getattr(module, "DATA", {}))
                REPORTS.update(getattr(module, "REPORTS", {}))
    return STAGES


def stage_path(stage: str, option: str, params: Any = None) -> str:
    """The default of ``stage``'s path option ``option`` under the layout of ``params``."""
    return layout(params).resolve(stages()[stage].options[option])


def add_path_option(parser: argparse.ArgumentParser, stage: str, option: str, help: str, **kwargs: Any) -> None:
    """``--option`` whose default is the declared path: None on the parser (filled by ``resolve_paths`` from the
    loaded params), shown in ``--help`` as it is with the schema's project directories."""
    key = stages()[stage].options[option]
    root = "project.reports_dir" if key.startswith("reports") else "project.data_dir"
    parser.add_argument(f"--{option}", default=None,
                        help=f"{help} (default: {stage_path(stage, option)}, under {root})", **kwargs)


def resolve_paths(args: argparse.Namespace, params: Any, stage: str) -> argparse.Namespace:
    """``args`` with every path option of ``stage`` left unset replaced by its path under ``params``' layout."""
    for option in stages()[stage].options:
        dest = option.replace("-", "_")
        if getattr(args, dest, "") is None:
            setattr(args, dest, stage_path(stage, option, params))
    return args
