"""Paths declared once: dvc.yaml and the stage CLIs' defaults follow components/common/layout.py and data_dir."""
from __future__ import annotations

import re
import shlex
from itertools import pairwise

import pytest
import yaml

from clipmill.cli import build_parser
from clipmill.components.common.layout import Layout, layout, resolve_paths, stages
from clipmill.params import load_params

from .conftest import REPO

DATA, REPORTS = "<data_dir>", "<reports_dir>"
TEMPLATES = {"${project.data_dir}": DATA, "${project.reports_dir}": REPORTS}

# The CLI command of each declared stage (the validate boundaries are subcommands).
CLI_ARGV = {name: ["stage", name] for name in stages() if name not in ("score_bootstrap", "ablate")}
CLI_ARGV.update({f"validate_{b}": ["stage", "validate", b] for b in ("download", "curate", "curated")})
CLI_ARGV["ablate"] = ["ablate"]


def _dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages with the project directories replaced by markers (a literal data/ path stays literal)."""
    text = (REPO / "dvc.yaml").read_text()
    for template, marker in TEMPLATES.items():
        text = text.replace(template, marker)
    return yaml.safe_load(text)["stages"]


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _expected(keys, lay: Layout) -> set[str]:
    return {lay.resolve(k) for k in keys}


def _check_paths(name: str, kind: str, listed: list[str], keys: tuple[str, ...]) -> list[str]:
    """Problems of one stage's deps or outs: a literal path, or one the declaration does not list (or vice versa)."""
    lay = Layout(DATA, REPORTS)
    problems = [f"{name}: {kind} '{p}' is a literal path (use ${{project.data_dir}} / ${{project.reports_dir}})"
                for p in listed if not p.startswith(("<", "${"))]
    marked = {p for p in listed if p.startswith("<")}
    expected = _expected(keys, lay)
    problems += [f"{name}: {kind} '{p}' is not declared in components/common/layout.py"
                 for p in sorted(marked - expected)]
    problems += [f"{name}: declared {kind} '{p}' is missing from dvc.yaml" for p in sorted(expected - marked)]
    return problems


def _check_cmd(name: str, cmd: str) -> list[str]:
    """Problems of one stage's command: a path option whose value is not the declared path."""
    spec, lay = stages()[name], Layout(DATA, REPORTS)
    declared = {**spec.options, **spec.passed}
    tokens = shlex.split(cmd)
    problems = [f"{name}: cmd has a literal data path '{t}'" for t in tokens
                if re.match(r"(data|reports)(/|$)", t)]
    for flag, value in pairwise(tokens):
        if not flag.startswith("--"):
            continue
        option = flag.removeprefix("--")
        if option in declared and value != lay.resolve(declared[option]):
            problems.append(f"{name}: cmd {flag} is '{value}', declared '{lay.resolve(declared[option])}'")
        elif option not in declared and (DATA in value or REPORTS in value):
            problems.append(f"{name}: cmd {flag} '{value}' is not a declared path option")
    return problems


def test_every_dvc_stage_is_declared():
    dvc = set(_dvc_stages())
    declared = {n for n, s in stages().items() if s.dvc}
    assert dvc == declared, f"dvc.yaml only: {sorted(dvc - declared)}; layout only: {sorted(declared - dvc)}"


def test_dvc_yaml_paths_follow_the_declaration():
    problems: list[str] = []
    for name, stage in _dvc_stages().items():
        spec = stages()[name]
        outs = _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))
        problems += _check_paths(name, "dep", _paths(stage.get("deps")), spec.deps)
        problems += _check_paths(name, "out", outs, spec.outs)
        problems += _check_cmd(name, stage["cmd"])
    assert not problems, "\n".join(problems)


def test_a_wrong_dvc_path_is_named():
    listed = ["<data_dir>/download/manifest.parquet", "<data_dir>/download/shards", "<data_dir>/scorer/model", "data/x"]
    assert _check_paths("curate", "dep", listed, stages()["curate"].deps) == [
        "curate: dep 'data/x' is a literal path (use ${project.data_dir} / ${project.reports_dir})",
        "curate: declared dep '<data_dir>/validation/download.json' is missing from dvc.yaml",
    ]
    assert _check_cmd("reshard", "clipmill stage reshard --curate <data_dir>/curated --out <data_dir>/curated") == [
        "reshard: cmd --curate is '<data_dir>/curated', declared '<data_dir>/curate'"]


def test_dvc_commands_parse_with_the_stage_clis():
    parser = build_parser()
    for name, stage in _dvc_stages().items():
        argv = shlex.split(re.sub(r"\$\{[\w.]+\}", "x", stage["cmd"]))
        assert argv[0] == "clipmill", name
        parser.parse_args(argv[1:])  # an unknown option exits


@pytest.mark.parametrize("name", sorted(CLI_ARGV))
def test_cli_path_defaults_follow_data_dir(name, tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["project"].update(data_dir=str(tmp_path / "elsewhere"), reports_dir=str(tmp_path / "out"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    args = build_parser().parse_args([*CLI_ARGV[name], "--params", str(tmp_path / "params.yaml")])
    params = load_params(args.params)
    args = resolve_paths(args, params, name)
    for option, key in stages()[name].options.items():
        value = getattr(args, option.replace("-", "_"))
        assert value == layout(params).resolve(key), (name, option)
        root = tmp_path / ("out" if key.startswith("reports") else "elsewhere")
        assert value.startswith(str(root)), (name, option, value)


def test_an_explicit_path_wins_and_help_shows_the_default(capsys):
    args = build_parser().parse_args(["stage", "reshard", "--out", "mine"])
    args = resolve_paths(args, load_params(REPO / "params.yaml"), "reshard")
    assert args.out == "mine" and args.curate == "data/curate"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stage", "reshard", "--help"])
    assert "data/download/shards, under project.data_dir" in " ".join(capsys.readouterr().out.split())


def test_layout_roots_and_unknown_names():
    lay = layout()
    assert lay.download.manifest == "data/download/manifest.parquet"
    assert lay.reports.validation.download == "reports/validation/download"
    assert Layout("s3://bucket/data/", "r").curate.steps == "s3://bucket/data/curate/steps"
    with pytest.raises(AttributeError, match="no path 'manifests'"):
        lay.resolve("download.manifests")


def test_the_cli_module_leaves_the_params_schema_to_its_commands():
    """A pool worker runs the main module's imports again (the ``clipmill`` script imports clipmill.cli): importing
    it must not build every stage's params schema, which only the command itself needs."""
    import subprocess
    import sys

    code = ("import sys, clipmill.cli; "
            "print(sorted(m for m in ('clipmill.params', 'pandas', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
