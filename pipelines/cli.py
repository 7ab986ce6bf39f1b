"""`clipmill run <flow>`: run a Prefect flow over the dvc.yaml stages."""
from __future__ import annotations

import argparse
from pathlib import Path

from .dag import FLOW_TARGETS


def _run(args: argparse.Namespace, params) -> int:
    from .flows import pipeline

    flow_name = "full" if args.flow == "demo" else args.flow
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    pipeline(flow_name=flow_name, root=str(Path(args.root).resolve()), stages=stages)
    summary = Path(args.root) / params.project.reports_dir / "run_summary.md"
    if summary.exists():
        print(summary.read_text())
    return 0


def register(subparsers, add_params_option) -> None:
    p = subparsers.add_parser(
        "run", help="run a flow (Prefect) over the dvc.yaml stages",
        description="Run a Prefect flow whose tasks are the dvc.yaml stages (`dvc repro --single-item`); "
                    "unchanged stages are skipped. Flows: " + ", ".join(
                        f"{k} (up to {', '.join(v) or 'every stage'})" for k, v in FLOW_TARGETS.items())
                    + "; demo = full on the embedded synthetic crawl.")
    p.add_argument("flow", choices=[*FLOW_TARGETS, "demo"])
    p.add_argument("--stages", default="", help="comma-separated stage names to run instead of the flow's set")
    p.add_argument("--root", default=".", help="project root holding dvc.yaml and params.yaml (default: .)")
    add_params_option(p)
    p.set_defaults(handler=_run)
