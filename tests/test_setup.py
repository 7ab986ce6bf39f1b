"""The environment `make setup` builds: no stdlib-shadowing backport, pinned versions, the CLI installed."""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import subprocess
import sys
import sysconfig
from pathlib import Path

from .conftest import REPO


def test_no_dataclasses_backport_shadows_the_stdlib():
    site = Path(sysconfig.get_paths()["purelib"])
    assert not (site / "dataclasses.py").exists(), "the dataclasses backport is back in site-packages"
    assert Path(dataclasses.__file__).resolve().is_relative_to(Path(sys.base_prefix).resolve())


def test_installed_versions_match_the_lock():
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = version.strip()
    for name in ("torch", "torchvision", "lightning", "open-clip-torch", "img2dataset", "mlflow", "prefect", "ray",
                 "great-expectations", "dvc", "fastapi"):
        assert md.version(name) == pins[name], name
    assert "dataclasses" not in pins


def test_fastapi_within_what_prefect_accepts():
    major, minor = (int(x) for x in md.version("fastapi").split(".")[:2])
    assert (major, minor) < (0, 151)


def test_cli_entry_point():
    out = subprocess.run([str(Path(sys.executable).parent / "clipmill"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "stage" in out.stdout and "run" in out.stdout
