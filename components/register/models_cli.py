"""``clipmill models``: list, compare, promote and roll back the registered models (handlers in ``models.py``)."""
from __future__ import annotations

import argparse


def _handler(name: str):
    """The ``models.<name>`` handler, imported when the command runs (mlflow loads only then)."""
    def run(args, params):
        from . import models

        return getattr(models, name)(args, params)
    return run


def register(subparsers, add_params_option) -> None:
    """Add ``clipmill models`` and its subcommands."""
    models = subparsers.add_parser("models", help="list, compare, promote and roll back registered models",
                                   description="The MLflow model registry: versions, aliases (champion, "
                                               "challenger) and the metrics they were registered with.")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    def action(name: str, handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        add_params_option(p)
        p.add_argument("--name", default=None, help="registered model name (default: register.model_name)")
        p.set_defaults(handler=handler)
        return p

    action("list", _handler("list_models"), "versions with their aliases, suite, key metrics and promotion outcome")
    action("promote", _handler("promote"), "make a version the champion (a person's decision; no policy)").add_argument(
        "version", help="model version number")
    action("rollback", _handler("roll_back"), "give champion back to the previous champion")
    cmp = action("compare", _handler("compare"), "metrics of two versions side by side on the same suite")
    cmp.add_argument("a", help="model version number")
    cmp.add_argument("b", help="model version number")
    cmp.add_argument("--eval-dir", default="data/eval",
                     help="suite to compare on; a version not yet measured on it is evaluated (default: %(default)s)")
