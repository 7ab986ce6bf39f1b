"""The ``clipmill`` command: run one stage, a whole flow, the demo web server, or manage models.

Every stage lives in ``components/<stage>/`` and exposes ``cli.py`` with ``HELP``, ``add_arguments(parser)``
and ``run(args, params)``; ``clipmill stage <stage>`` finds it by name.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.log import quiet_third_party

# The params schema (every stage's section) is imported where it is used, not with this module: a pool worker that
# multiprocessing forks or spawns runs the main module's imports again (the ``clipmill`` script imports this one),
# and the download and curation workers need none of it.


def stage_modules() -> dict[str, object]:
    """Stage name -> its ``clipmill.components.<stage>.cli`` module, for every stage package that has one."""
    from clipmill.components.common.packages import package_modules

    return package_modules("cli")


def _add_params_option(p: argparse.ArgumentParser) -> None:
    from .params import DEFAULT_PARAMS

    p.add_argument("--params", default=DEFAULT_PARAMS, metavar="FILE",
                   help=f"params file (default: {DEFAULT_PARAMS})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipmill",
        description="CLIP-style pretraining pipeline: crawl -> download -> curate -> train -> evaluate -> register.",
        epilog="Configuration lives in params.yaml (see README.md, 'Configuration reference').",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    stage = sub.add_parser("stage", help="run one pipeline stage (as dvc.yaml does)",
                           description="Run one pipeline stage. `dvc repro` and the Prefect flows call these.")
    stage_sub = stage.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, mod in stage_modules().items():
        sp = stage_sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        _add_params_option(sp)
        mod.add_arguments(sp)
        sp.set_defaults(handler=mod.run, needs_params=True)

    for extra in ("clipmill.pipelines.cli", "clipmill.pipelines.serve", "clipmill.pipelines.ablate_cli",
                  "clipmill.components.demo_corpus.server_cli", "clipmill.components.demo_corpus.batch_cli",
                  "clipmill.components.register.models_cli", "clipmill.docs"):
        try:
            mod = importlib.import_module(extra)
        except ModuleNotFoundError as e:
            if e.name is None or not extra.startswith(e.name):
                raise
            continue
        mod.register(sub, _add_params_option)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .params import load_params

        params = load_params(args.params) if getattr(args, "params", None) else None
        if getattr(args, "needs_params", False):  # a stage: its tracking store must work before its work starts
            from clipmill.components.common.tracking import check_tracking

            check_tracking(params.tracking)
        rc = args.handler(args, params)
    except ClipmillError as e:
        print(f"clipmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipmill: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
