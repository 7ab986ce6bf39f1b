"""The data boundaries that can be validated: boundary name -> its inputs and the checks that run on them.

Adding a boundary is one entry in ``BOUNDARIES``. Suites are imported only when their boundary runs, so the CLI
does not pay for importing Great Expectations.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Boundary:
    help: str
    inputs: dict[str, tuple[str, str]]  # CLI option name (without --) -> (default path, help)
    checks: Callable[[dict[str, Path], Any], list]  # (input paths by option name, Params) -> [TableCheck]


def _download(paths: dict[str, Path], params) -> list:
    from .suites_download import download_checks

    return download_checks(paths["manifest"], params.validation.download)


def _curate(paths: dict[str, Path], params) -> list:
    from .suites_curation import curate_checks

    return curate_checks(paths["curate"], params.curate.steps, params)


def _curated(paths: dict[str, Path], params) -> list:
    from .suites_curation import curated_checks

    return curated_checks(paths["curated"])


BOUNDARIES: dict[str, Boundary] = {
    "download": Boundary("the download manifest", {
        "manifest": ("data/download/manifest.parquet", "download manifest (input)")}, _download),
    "curate": Boundary("every listed curation step's decisions and the steps' own tables", {
        "curate": ("data/curate", "curation directory: units/, steps/ (input)")}, _curate),
    "curated": Boundary("the curated shards and their manifest", {
        "curated": ("data/curated", "curated shards directory with manifest.parquet (input)")}, _curated),
}
