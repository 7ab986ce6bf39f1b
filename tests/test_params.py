"""params.yaml schema: the committed file loads; typos, wrong types and bad values get one clear line."""
from __future__ import annotations

import re

import pytest
import yaml

from clipmill.cli import main
from clipmill.components.common.errors import ClipmillError, ConfigError
from clipmill.components.common.io import load_yaml
from clipmill.params import load_params, parse_params

from .conftest import REPO


def test_committed_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.tracking.experiment


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        parse_params({"tracking": {"experimnt": "x"}})
    msg = str(e.value)
    assert "tracking.experimnt: unknown key" in msg and "did you mean 'experiment'" in msg
    assert "\n" not in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"trainn: unknown key"):
        parse_params({"trainn": {}})


def test_wrong_type_and_range():
    with pytest.raises(ConfigError, match=r"ray\.num_cpus: .*integer.*\(got 'two'\)"):
        parse_params({"ray": {"num_cpus": "two"}})
    with pytest.raises(ConfigError, match=r"project\.seed: .*greater than or equal to 0"):
        parse_params({"project": {"seed": -1}})


def test_not_yaml_and_missing(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("project: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``train:`` pasted at the end would silently replace the
    whole first section."""
    text = (REPO / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text + "train:\n  max_steps: 3\n")
    first = next(i for i, line in enumerate(text.splitlines()) if line.startswith("train:")) + 1
    last = len(text.splitlines()) + 1
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(e.value) == (f"{path}: line {last} not valid YAML: key 'train' given twice in one mapping "
                            f"(first on line {first})")
    path.write_text("project:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"line 3 not valid YAML: key 'seed' given twice .*first on line 2"):
        load_params(path)
    path.write_text("base: &b {seed: 1}\nproject:\n  <<: *b\n  run_name: x\n")  # merge keys still work
    assert load_yaml(path.read_text())["project"] == {"seed": 1, "run_name": "x"}


def test_prefect_yaml_with_a_key_twice_or_no_mapping(tmp_path):
    from clipmill.pipelines.serve import load_deployments

    path = tmp_path / "prefect.yaml"
    path.write_text("deployments:\n- name: a\n  name: b\n  entrypoint: pipelines/flows.py:pipeline\n")
    with pytest.raises(ClipmillError, match=r"not valid YAML: .*key 'name' given twice"):
        load_deployments(path)
    path.write_text("deployments: weekly\n")
    with pytest.raises(ClipmillError, match="expected a mapping with a list of deployments"):
        load_deployments(path)
    path.write_text("deployments:\n- weekly\n- name: w\n  entrypoint: pipelines/flows.py:pipeline\n")
    assert [d["name"] for d in load_deployments(path)] == ["w"]
    path.write_text("deployments:\n- entrypoint: pipelines/flows.py:pipeline\n")
    with pytest.raises(ClipmillError, match="without a name"):
        load_deployments(path)
    path.write_text("deployments:\n- name: w\n  entrypoint: pipelines/flows.py:pipeline\n  schedules: weekly\n")
    with pytest.raises(ClipmillError, match="schedules must be a list"):
        load_deployments(path)


def test_cli_reports_a_params_typo_in_one_line(tmp_path, capsys):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["project"]["sed"] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = main(["run", "full", "--params", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "project.sed: unknown key" in err[0] and "did you mean 'seed'" in err[0]


def _raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _has_key(data: dict, dotted: str) -> bool:
    node: object = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_params_key_dvc_reads_is_in_params_yaml():
    """DVC reads params.yaml itself (not the schema): a key a stage lists or interpolates must be written there."""
    dvc_text = (REPO / "dvc.yaml").read_text()
    listed = [p for stage in yaml.safe_load(dvc_text)["stages"].values() for p in stage.get("params", [])
              if isinstance(p, str)]
    interpolated = re.findall(r"\$\{([\w.]+)\}", dvc_text)
    raw = _raw_params()
    missing = sorted({k for k in listed + interpolated if not _has_key(raw, k)})
    assert listed and interpolated and not missing, f"keys dvc.yaml reads but params.yaml lacks: {missing}"


def _values_without_reason(text: str) -> list[str]:
    """Value lines with no comment on them nor on an enclosing section line (``{}`` sections excepted)."""
    silent = []
    parents: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing section lines
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" -"))
        parents = [p for p in parents if p[0] < indent]
        commented = "#" in line or any(c for _, c in parents)
        if re.match(r"^\s*(- )?\w+:\s*(#.*)?$", line):  # a section header
            parents.append((indent, commented))
        elif not (commented or line.rstrip().endswith("{}")):
            silent.append(f"line {number}: {line.strip()}")
    return silent


def test_params_yaml_gives_a_reason_for_each_choice():
    """params.yaml holds only the demo's choices: each value carries a comment, on its line or its section's."""
    silent = _values_without_reason((REPO / "params.yaml").read_text())
    assert not silent, "params.yaml values without a reason:\n" + "\n".join(silent)
    sample = "a:  # why\n  b: 1\nc:\n  d: 2  # why\n  e: 3\nf: {}\n"
    assert _values_without_reason(sample) == ["line 5: e: 3"]


def test_a_missing_section_takes_the_schema_defaults():
    params = parse_params({"project": {"data_dir": "elsewhere"}})
    assert params.project.data_dir == "elsewhere" and params.project.reports_dir == "reports"
    assert params.filter.min_image_side == 200 and params.demo_corpus.zeroshot_per_class == 20
