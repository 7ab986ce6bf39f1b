"""The registry under faults: an error is never "absent", and concurrent promotions never lose a move."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from clipmill.components.common.evaluation import EvaluationRecord
from clipmill.components.register import promotion
from clipmill.components.register.params import RegisterParams
from clipmill.components.register.promotion import TAG_OUTCOME, TAG_PREVIOUS, apply_policy, move_champion, rollback
from clipmill.components.register.registry import (
    CHAMPION,
    RegistryError,
    alias_version,
    champion_history,
    find_by_hash,
    get_version,
    record_metrics,
)
from tests.registry_fixtures import policy_metrics

POLICY = RegisterParams(min_improvement=0.01, guardrail_tolerance=0.02)


@contextmanager
def registry_answering(status: int, error_code: str):
    """A loopback HTTP server that answers every MLflow REST call with one error."""
    body = json.dumps({"error_code": error_code, "message": f"stub registry says {error_code}"}).encode()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_registry_error_is_not_no_champion(tmp_path, monkeypatch):
    from clipmill.components.common.params import TrackingParams
    from clipmill.pipelines.continual import write_champion_warm_start

    params = SimpleNamespace(register=RegisterParams(), tracking=TrackingParams())
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("CLIPMILL_REGISTRY_LOCK_DIR", str(tmp_path / "locks"))
    with registry_answering(403, "PERMISSION_DENIED") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        with pytest.raises(RegistryError, match=rf"registry \({uri}\) failed to read model 'clipmill': "
                                                r"PERMISSION_DENIED"):
            alias_version(client, "clipmill", CHAMPION)
        with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
            find_by_hash(client, "clipmill", "abc")  # not "unregistered", which would create a duplicate version
        with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
            write_champion_warm_start(tmp_path, params)  # not "no champion, so from scratch"
        assert not (tmp_path / "warm_start.yaml").exists()

    with registry_answering(404, "RESOURCE_DOES_NOT_EXIST") as uri:  # the one answer that means "absent"
        client = MlflowClient(uri)
        assert alias_version(client, "clipmill", CHAMPION) is None
        assert find_by_hash(client, "clipmill", "abc") is None


def _versions(client: MlflowClient, tmp_path, accs: list[float]) -> list:
    client.create_registered_model("clipmill")
    out = []
    for i, acc in enumerate(accs):
        (tmp_path / f"m{i}").mkdir()
        v = client.create_model_version("clipmill", str(tmp_path / f"m{i}"))
        record = EvaluationRecord("test-1", f"hash{i}", policy_metrics(acc))
        record_metrics(client, v, record)
        out.append((get_version(client, "clipmill", v.version), record))
    return out


def test_concurrent_promotions_leave_one_consistent_champion_and_a_complete_history(tmp_path, mlflow_uri,
                                                                                    monkeypatch):
    client = MlflowClient(mlflow_uri)
    (v1, _), second, third = _versions(client, tmp_path, [0.40, 0.45, 0.50])
    move_champion(client, "clipmill", v1.version)

    # Both registrations read champion 1 and decide before either moves the alias: the race the lock must survive.
    both_decided = threading.Barrier(2, timeout=30)
    waited: set[int] = set()
    real_decide = promotion.decide

    def racing_decide(*args, **kwargs):
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            both_decided.wait()
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(promotion, "decide", racing_decide)
    results, errors = {}, []

    def register(version, record):
        try:
            results[str(version.version)] = apply_policy(MlflowClient(mlflow_uri), version, record, POLICY, tmp_path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=register, args=pair) for pair in (second, third)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors

    history = champion_history(client, "clipmill")
    champion = str(alias_version(client, "clipmill", CHAMPION).version)
    assert history[0] == "1" and history[-1] == champion == "3"  # the best model wins whatever the order
    promoted = {v for v, r in results.items() if r.decision.promote}
    assert promoted <= set(history), (promoted, history)  # no promotion lost from the history
    for before, after in zip(history, history[1:]):  # each champion names the one it really replaced
        assert client.get_model_version("clipmill", after).tags[TAG_PREVIOUS] == before
    for version, result in results.items():  # each decision names the champion it was applied against
        tag = client.get_model_version("clipmill", version).tags[TAG_OUTCOME]
        assert tag == result.decision.outcome
        if result.decision.promote:
            assert history[history.index(version) - 1] == (result.champion_version or "none")

    assert rollback(client, "clipmill") == ("3", history[-2])  # rollback follows the complete history
