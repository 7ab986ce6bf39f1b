"""Packaging: the top-level folders components/ and pipelines/ install as clipmill.components and
clipmill.pipelines (the metadata is in pyproject.toml)."""
from setuptools import find_packages, setup

MAPPED = ("components", "pipelines")

setup(
    packages=["clipmill"] + [f"clipmill.{top}{'.' + sub if sub else ''}" for top in MAPPED
                             for sub in ["", *find_packages(top)]],
    package_dir={"clipmill": "clipmill", **{f"clipmill.{top}": top for top in MAPPED}},
)
