"""params.yaml schema: the committed file loads; typos, wrong types and bad values get one clear line."""
from __future__ import annotations

import pytest
import yaml

from clipmill.cli import main
from clipmill.params import load_params, parse_params
from components.common.errors import ConfigError

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


def test_cli_reports_a_params_typo_in_one_line(tmp_path, capsys):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["project"]["sed"] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = main(["run", "full", "--params", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "project.sed: unknown key" in err[0] and "did you mean 'seed'" in err[0]
