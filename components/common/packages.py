"""The packages under components/ and the modules they declare: how the CLI finds each stage's command and the
params schema each package's sections, so that adding a stage edits no central list."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

COMPONENTS = Path(__file__).resolve().parents[1]
PACKAGE = __name__.rsplit(".", 2)[0]  # the importable name of components/ (``components`` or a namespace's)


def package_modules(module: str) -> dict[str, ModuleType]:
    """Package name -> its ``<package>.<module>`` module, for every package under components/ (but the core
    library) that has one, by name."""
    out = {}
    for info in sorted(pkgutil.iter_modules([str(COMPONENTS)]), key=lambda m: m.name):
        if not info.ispkg or info.name == "common":
            continue
        name = f"{PACKAGE}.{info.name}.{module}"
        try:
            out[info.name] = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise  # the package has the module but one of its own imports is broken
    return out
