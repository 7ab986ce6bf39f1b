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


def test_the_wheel_installs_one_clipmill_namespace_with_its_data(tmp_path):
    """components/ and pipelines/ install as clipmill.components and clipmill.pipelines (no generic top-level
    names that another package could collide with), with the model configs and metadata files."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("clipmill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.startswith("clipmill-")}
    assert packages == {"clipmill"}
    for expected in ("clipmill/components/common/model_configs/clipmill-tiny.json",
                     "clipmill/components/balance/metadata/default.txt", "clipmill/components/train/cli.py",
                     "clipmill/pipelines/flows.py", "clipmill/cli.py"):
        assert expected in names
