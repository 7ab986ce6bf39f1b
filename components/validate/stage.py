"""Running a boundary's Great Expectations checks: results JSON, HTML data docs, an MLflow run, and one error
line listing every failed expectation."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.io import atomic_path, check_replaceable, write_json
from clipmill.components.common.log import get_logger
from clipmill.components.common.tracking import stage_run

from .boundaries import BOUNDARIES

log = get_logger("validate")

DOCS_SITE = "clipmill"


class ValidationFailed(ClipmillError):
    """At least one expectation failed; the message lists them (table, expectation, column, observed)."""


def _jsonable(value: Any) -> Any:
    """Plain JSON types (GX results hold numpy scalars, NaN and pandas values)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _exception_message(info: dict) -> str | None:
    """GX reports an expectation's error either directly or per metric it could not compute."""
    if info.get("raised_exception"):
        return info.get("exception_message")
    nested = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return nested[0].get("exception_message") if nested else None


def _expectation_record(result) -> dict:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    details = result.result or {}
    exception = _exception_message(result.exception_info or {})
    return _jsonable({
        "expectation": config.type,
        "column": kwargs.get("column"),
        "description": config.description,
        "success": bool(result.success),
        "observed_value": details.get("observed_value"),
        "unexpected_count": details.get("unexpected_count"),
        "unexpected_percent": details.get("unexpected_percent"),
        "partial_unexpected_list": details.get("partial_unexpected_list"),
        "mismatched_columns": (details.get("details") or {}).get("mismatched"),
        "exception": exception,
        "kwargs": kwargs,
    })


def _observed(record: dict) -> str:
    if record["exception"]:
        return f"error: {record['exception']}"
    if record["mismatched_columns"]:
        return f"columns {record['mismatched_columns']}"
    if record["observed_value"] is not None:
        return f"observed {record['observed_value']}"
    if record["unexpected_count"] is not None:
        examples = (record["partial_unexpected_list"] or [])[:3]
        return f"{record['unexpected_count']} unexpected ({record['unexpected_percent']:.1f}%), e.g. {examples}"
    return "failed"


def failure_lines(results: dict) -> list[str]:
    """One short line per failed expectation: table, expectation(column) [description]: observed value."""
    lines = []
    for check in results["checks"]:
        for r in check["expectations"]:
            if not r["success"]:
                target = f"({r['column']})" if r["column"] else ""
                described = f" [{r['description']}]" if r["description"] else ""
                lines.append(f"{check['table']}: {r['expectation']}{target}{described}: {_observed(r)}")
    return lines


def run_checks(boundary: str, checks: list, docs_dir: Path) -> dict:
    """Validate each ``TableCheck`` in a throwaway file-backed GX context; data docs are built into ``docs_dir``
    (replaced atomically). Returns the results as plain JSON."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    with tempfile.TemporaryDirectory(prefix="clipmill-gx-") as project, \
            atomic_path(docs_dir, owner="validate") as docs_tmp:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = {"globally": False, "metric_calculations": False}
        context.add_data_docs_site(site_name=DOCS_SITE, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_tmp)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        datasource = context.data_sources.add_pandas(boundary)
        records = []
        for check in checks:
            batch = datasource.add_dataframe_asset(check.name).add_batch_definition_whole_dataframe("whole")
            suite = context.suites.add(check.suite())
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=check.suite_name, data=batch, suite=suite))
            result = definition.run(batch_parameters={"dataframe": check.frame}, result_format="SUMMARY")
            records.append({"table": check.name, "suite": check.suite_name, "rows": len(check.frame),
                            "success": bool(result.success),
                            "expectations": [_expectation_record(r) for r in result.results]})
        context.build_data_docs(site_names=[DOCS_SITE])
    return {"boundary": boundary, "success": all(r["success"] for r in records), "checks": records}


def validate(boundary: str, inputs: dict[str, str | os.PathLike], params, out_dir: str | os.PathLike,
             reports_dir: str | os.PathLike) -> dict:
    """Validate ``boundary`` (a key of ``BOUNDARIES``) on ``inputs`` (its input paths by option name).

    Writes ``out_dir/<boundary>.json`` (success flag and every expectation's result) and the data docs
    ``reports_dir/<boundary>/index.html``, records an MLflow run, and raises ``ValidationFailed`` listing the
    failed expectations. Returns the results.
    """
    spec = BOUNDARIES[boundary]
    paths = {name: Path(p) for name, p in inputs.items()}
    results_file = Path(out_dir) / f"{boundary}.json"
    docs_dir = Path(reports_dir) / boundary
    results_file.unlink(missing_ok=True)  # a run that stops early leaves no stale results that look current
    checks = spec.checks(paths, params)  # unusable inputs are an error before any output is touched
    check_replaceable(docs_dir, "validate")  # never removes a directory that is not its own data docs
    shutil.rmtree(docs_dir, ignore_errors=True)
    with stage_run(f"validate_{boundary}", params.tracking, params.validation, list(paths.values())) as run:
        results = run_checks(boundary, checks, docs_dir)
        results["inputs"] = {name: str(p) for name, p in paths.items()}
        write_json(results, results_file)
        evaluated = sum(len(c["expectations"]) for c in results["checks"])
        failures = failure_lines(results)
        log.info("%s: %d of %d expectations passed; data docs: %s", boundary, evaluated - len(failures), evaluated,
                 docs_dir / "index.html")
        if run is not None:
            import mlflow

            mlflow.set_tag("clipmill.boundary", boundary)
            mlflow.log_metrics({"success": float(results["success"]), "expectations": evaluated,
                                "failed_expectations": len(failures)})
            mlflow.log_artifact(str(results_file))
    if failures:
        raise ValidationFailed(f"validation of '{boundary}' failed ({len(failures)} of {evaluated} expectations): "
                               + "; ".join(failures))
    return results

