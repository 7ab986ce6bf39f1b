"""`clipmill run <flow>`: run a Prefect flow over the dvc.yaml stages."""
from __future__ import annotations

import argparse
from pathlib import Path

from .dag import FLOW_TARGETS

TERMINATED_EXIT = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM reached `clipmill run` (a BaseException, so that no `except Exception` swallows it)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _check_inputs(root: Path, new_urls: str | None) -> None:
    """What the flow would find missing only after its Prefect server started (seconds, and a logged traceback):
    the project's dvc.yaml, and a --new-urls list that is not there or not a parquet file."""
    from clipmill.components.common.errors import ClipmillError, InputError
    from clipmill.components.common.storage import unreadable_parquet

    if not (root / "dvc.yaml").is_file():
        raise ClipmillError(f"{root.resolve() / 'dvc.yaml'}: no such file (run from the project root, or pass --root)")
    if new_urls is not None:
        if not Path(new_urls).is_file():
            raise InputError(new_urls, "no such file (--new-urls takes a URL list in parquet)")
        if damaged := unreadable_parquet(new_urls):
            raise InputError(new_urls, f"{damaged} (--new-urls takes a URL list in parquet)")


def _run(args: argparse.Namespace, params) -> int:
    import os
    import signal
    import sys

    from clipmill.components.common.tracking import check_tracking
    from clipmill.params import load_params

    from .runlock import RUN_LOCKED_EXIT, RunLocked, run_lock

    # Without PREFECT_API_URL the flow starts a temporary local server; its first start on a new machine
    # creates and migrates the database, which takes longer than Prefect's default 20 s wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    flow_name = "full" if args.flow == "demo" else args.flow
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    check_tracking(load_params(Path(args.root) / "params.yaml").tracking)  # the flow's params: one line, no server
    _check_inputs(Path(args.root), args.new_urls)
    # SIGTERM unwinds the run like Ctrl-C: the flow terminates its stage's process group and closes its runs, and
    # the normal exit stops the temporary Prefect server (Prefect re-raises SIGTERM through this handler).
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with run_lock(args.root, f"clipmill run {args.flow}"):  # before any server starts: a refusal is immediate
            from .flows import StageFailed, pipeline, terminate_stages

            try:
                pipeline(flow_name=flow_name, root=str(Path(args.root).resolve()), stages=stages,
                         new_urls=str(Path(args.new_urls).resolve()) if args.new_urls else None,
                         continual=args.continual, commit=args.commit, push=args.push)
            except StageFailed as e:
                print(f"clipmill: error: {e}", file=sys.stderr)
                return 1
            finally:
                terminate_stages()
    except RunLocked as e:
        print(f"clipmill: error: {e}", file=sys.stderr)
        return RUN_LOCKED_EXIT
    except Terminated:
        print("clipmill: terminated (SIGTERM): the running stage was stopped", file=sys.stderr)
        return TERMINATED_EXIT
    finally:
        signal.signal(signal.SIGTERM, previous)
    root = Path(args.root)
    summary = root / params.project.reports_dir / "run_summary.md"
    if summary.exists():
        print(summary.read_text())
    if args.flow == "demo":
        print(champion_report(root, params))
    return 0


def champion_report(root: Path, params) -> str:
    """What the demo leaves in the registry: the champion, its metrics, and how to serve and query it."""
    from clipmill.components.common.io import read_json

    registration = root / params.project.data_dir / "register" / "registration.json"
    if not registration.exists():
        return "No model was registered by this run (see the run summary above)."
    reg = read_json(registration)
    decision = reg["promotion"]["decision"]
    champion = reg["version"] if decision["outcome"] == "promoted" else reg["promotion"].get("champion_version")
    metrics = read_json(root / params.project.data_dir / "evaluate" / "metrics.json")["metrics"]
    name = reg["name"]
    lines = [f"Registered {reg['model_uri']} (alias challenger); decision: {decision['outcome']} - "
             f"{decision['reason']}.",
             f"Champion: models:/{name}@champion = version {champion or 'none'}. This run's model, on suite "
             f"{reg['suite_version']}:"]
    lines += [f"  {k:<42} {v:.4f}" for k, v in sorted(metrics.items())]
    lines += ["", "Serve and query the champion:",
              f"  .venv/bin/mlflow models serve -m models:/{name}@champion --env-manager local "
              "--host 127.0.0.1 --port 5001",
              "  curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\",
              """    -d '{"dataframe_records": [{"text": "a photo of a red circle"}]}'""",
              "Browse: make mlflow-ui (runs, registry) | make prefect-ui (flow runs) | "
              f"{params.project.reports_dir}/curation/index.html | {params.project.reports_dir}/promotion.md"]
    return "\n".join(lines)


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
    p.add_argument("--new-urls", metavar="PARQUET",
                   help="append this URL list (url, caption, ...) to the crawl first: it is checked, copied under "
                        "download.additions and tracked with `dvc add`; the download stage then fetches it too")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--continual", dest="continual", action="store_true", default=None,
                       help="warm-start training from the current champion (models:/NAME@champion, written to "
                            "warm_start.yaml as a fixed version) with the continual: schedule; from scratch while "
                            "there is no champion")
    start.add_argument("--from-scratch", dest="continual", action="store_false",
                       help="reset warm_start.yaml: train from scratch (default: keep warm_start.yaml as it is)")
    p.add_argument("--commit", action="store_true",
                   help="after a successful run, commit its data version (dvc.lock, warm_start.yaml, the crawl "
                        "additions' .dvc files) to git; the registered model version is tagged with the commit")
    p.add_argument("--push", action="store_true", help="after a successful run, `dvc push` its data to the "
                                                         "default DVC remote")
    add_params_option(p)
    p.set_defaults(handler=_run)
