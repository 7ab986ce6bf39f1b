"""`clipmill serve`: run the deployments of prefect.yaml on this machine (``prefect.serve``), schedules included."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.io import load_yaml, read_text


def load_deployments(prefect_yaml: str | Path) -> list[dict]:
    """The ``deployments`` of prefect.yaml that run the clipmill pipeline flow."""
    path = Path(prefect_yaml)
    if not path.exists():
        raise ClipmillError(f"{path}: no such file")
    try:
        doc = load_yaml(read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ClipmillError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("deployments") or [], list):
        raise ClipmillError(f"{path}: expected a mapping with a list of deployments")
    deployments = doc.get("deployments") or []
    ours = [d for d in deployments if isinstance(d, dict) and str(d.get("entrypoint", "")).endswith(":pipeline")]
    if not ours:
        raise ClipmillError(f"{path}: no deployment with entrypoint pipelines/flows.py:pipeline")
    for d in ours:
        if not isinstance(d.get("name"), str) or not d["name"].strip():
            raise ClipmillError(f"{path}: a deployment of pipelines/flows.py:pipeline without a name")
        if not isinstance(d.get("schedules") or [], list) or not isinstance(d.get("parameters") or {}, dict):
            raise ClipmillError(f"{path}: deployment {d['name']!r}: schedules must be a list and parameters a mapping")
    return ours


def build_deployments(prefect_yaml: str | Path, root: str | Path) -> list:
    """Prefect ``RunnerDeployment`` objects (name, cron schedules, parameters) for ``prefect.serve``."""
    from .flows import pipeline

    out = []
    for d in load_deployments(prefect_yaml):
        crons = [s["cron"] for s in d.get("schedules") or [] if isinstance(s, dict) and "cron" in s]
        params = {**(d.get("parameters") or {}), "root": str(Path(root).resolve())}
        out.append(pipeline.to_deployment(name=d["name"], description=d.get("description"),
                                          cron=crons or None, parameters=params,
                                          concurrency_limit=d.get("concurrency_limit")))
    return out


def _serve(args: argparse.Namespace, params) -> int:
    from prefect import serve

    deployments = build_deployments(Path(args.root) / "prefect.yaml", args.root)
    print("serving: " + ", ".join(d.name for d in deployments) + " (Ctrl-C stops)")
    serve(*deployments)
    return 0


def register(subparsers, add_params_option) -> None:
    p = subparsers.add_parser("serve", help="run the scheduled deployments of prefect.yaml on this machine",
                              description="Serve the deployments of prefect.yaml (flow.serve): their cron "
                                          "schedules trigger runs here until Ctrl-C. Needs a Prefect server "
                                          "(PREFECT_API_URL) to keep schedules between restarts.")
    p.add_argument("--root", default=".", help="project root holding prefect.yaml and dvc.yaml")
    add_params_option(p)
    p.set_defaults(handler=_serve)
