"""The promotion policy: never a worse model, a better one promoted, rollback, idempotency, suite changes."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from clipmill.cli import main
from clipmill.components.common.evaluation import evaluate_source
from clipmill.components.register.params import RegisterParams
from clipmill.components.register.policy import PROMOTED, REJECTED, decide
from tests.conftest import REPO
from tests.registry_fixtures import policy_metrics, tiny_model, write_eval_suite, write_record

PARAMS = str(REPO / "params.yaml")
POLICY = RegisterParams(min_improvement=0.01, min_primary=0.2, guardrail_tolerance=0.02)


def test_policy_promotes_only_a_clear_improvement_without_guardrail_regressions():
    champion = policy_metrics(0.40, guard=0.50)
    assert decide(policy_metrics(0.30), None, POLICY).outcome == PROMOTED  # first model above the bar
    assert decide(policy_metrics(0.10), None, POLICY).outcome == REJECTED  # below the minimum bar
    assert decide(policy_metrics(0.41), champion, POLICY).outcome == PROMOTED  # exactly the margin
    assert decide(policy_metrics(0.405), champion, POLICY).outcome == REJECTED  # within the margin
    assert decide(policy_metrics(0.39), champion, POLICY).outcome == REJECTED  # worse
    assert decide(policy_metrics(0.60, guard=0.485), champion, POLICY).outcome == PROMOTED  # drop within tolerance
    broken = decide(policy_metrics(0.60, guard=0.47), champion, POLICY)
    assert broken.outcome == REJECTED and "guardrail" in broken.reason
    assert (broken.delta == pytest.approx(0.20)
            and broken.guardrail_deltas["zeroshot/mean_per_class_recall"] == pytest.approx(-0.03))
    with pytest.raises(Exception, match="no 'zeroshot/acc1'"):
        decide({"other": 1.0}, None, POLICY)


@pytest.fixture
def ws(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    write_eval_suite(tmp_path / "eval")
    return tmp_path


def register(ws, tag: str, metrics: dict[str, float] | None = None, suite: str = "test-1", seed: int = 0) -> int:
    """Register model ``tag`` (created on first use, with ``metrics`` as its evaluation record)."""
    model = ws / f"model-{tag}"
    if not model.exists():
        tiny_model(model, seed=seed)
        write_record(model, ws / f"metrics-{tag}.json", metrics, suite_version=suite)
    return main(["stage", "register", "--params", PARAMS, "--model", str(model), "--metrics",
                 str(ws / f"metrics-{tag}.json"), "--train-run", str(ws / "none.json"), "--curated", str(ws / "none"),
                 "--eval-dir", str(ws / "eval"), "--out", str(ws / "register"), "--reports", str(ws / "reports")])


def registry_state(client: MlflowClient) -> dict:
    model = client.get_registered_model("clipmill")
    versions = client.search_model_versions("name='clipmill'")
    return {"aliases": dict(model.aliases), "tags": dict(model.tags),
            "versions": {str(v.version): dict(v.tags) for v in versions}}


def test_champion_moves_only_forward_rolls_back_and_reruns_change_nothing(ws, mlflow_uri, capsys):
    client = MlflowClient(mlflow_uri)
    champion = lambda: str(client.get_model_version_by_alias("clipmill", "champion").version)  # noqa: E731
    challenger = lambda: str(client.get_model_version_by_alias("clipmill", "challenger").version)  # noqa: E731

    assert register(ws, "a", policy_metrics(0.40), seed=1) == 0
    assert champion() == "1"  # the first passing model

    assert register(ws, "b", policy_metrics(0.38), seed=2) == 0  # worse: never promoted
    assert (champion(), challenger()) == ("1", "2")
    report = (ws / "reports" / "promotion.md").read_text()
    assert "**rejected**" in report and "| `zeroshot/acc1` | primary | 0.4000 | 0.3800 | -0.0200 |" in report
    decision = json.loads(client.get_model_version("clipmill", "2").tags["clipmill.promotion"])
    assert decision["champion_version"] == "1" and decision["decision"]["delta"] == pytest.approx(-0.02)

    before = registry_state(client)
    assert register(ws, "b") == 0  # the same decision again: nothing changes
    assert registry_state(client) == before
    assert (ws / "reports" / "promotion.md").read_text() == report

    assert register(ws, "c", policy_metrics(0.45), seed=3) == 0  # better by more than the margin
    assert champion() == "3"
    assert client.get_model_version("clipmill", "3").tags["clipmill.previous_champion"] == "1"
    report = (ws / "reports" / "promotion.md").read_text()
    assert "**promoted**" in report and "| `zeroshot/acc1` | primary | 0.4000 | 0.4500 | +0.0500 |" in report
    before = registry_state(client)
    assert register(ws, "c") == 0
    assert registry_state(client) == before
    assert (ws / "reports" / "promotion.md").read_text() == report

    capsys.readouterr()
    assert main(["models", "rollback", "--params", PARAMS]) == 0
    assert champion() == "1"
    assert "version 1 (rolled back from 3)" in capsys.readouterr().out
    assert register(ws, "c") == 0  # a rolled-back model is not promoted again by the policy
    assert champion() == "1"
    assert "was rolled back" in (ws / "reports" / "promotion.md").read_text()

    assert main(["models", "promote", "3", "--params", PARAMS]) == 0  # a person's decision
    assert champion() == "3"
    assert main(["models", "promote", "3", "--params", PARAMS]) == 2
    assert "already the champion" in capsys.readouterr().err
    assert main(["models", "rollback", "--params", PARAMS]) == 0
    assert champion() == "1"
    assert main(["models", "rollback", "--params", PARAMS]) == 2
    assert "first champion" in capsys.readouterr().err


def test_a_champion_from_another_suite_is_re_evaluated_before_comparing(ws, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    assert register(ws, "old", policy_metrics(0.90), suite="test-0", seed=1) == 0
    write_eval_suite(ws / "eval", version="test-1")
    measured = evaluate_source(str(ws / "model-old"), ws / "eval").metrics  # what the champion scores on test-1

    better = {**measured, "zeroshot/acc1": measured["zeroshot/acc1"] + 0.05}
    assert register(ws, "new", better, suite="test-1", seed=2) == 0
    decision = json.loads(client.get_model_version("clipmill", "2").tags["clipmill.promotion"])["decision"]
    assert decision["outcome"] == PROMOTED  # 0.90 on the old suite does not count against it
    assert decision["champion_value"] == pytest.approx(measured["zeroshot/acc1"])
    recorded = json.loads(client.get_model_version("clipmill", "1").tags["clipmill.eval.test-1"])
    assert recorded == pytest.approx(measured)
