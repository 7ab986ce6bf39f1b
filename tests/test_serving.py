"""`mlflow models serve` on the registered champion answers image and text embedding requests over HTTP."""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request

import pandas as pd
import pytest
import torch
from PIL import Image

from clipmill.cli import main
from clipmill.components.common.model import embed_images, embed_texts, load_clip
from tests.conftest import REPO
from tests.registry_fixtures import (
    free_port,
    png,
    policy_metrics,
    running_server,
    tiny_model,
    write_eval_suite,
    write_record,
)


def model_with_limits(tmp_path, **limits):
    """The served pyfunc over a tiny model, with its request limits set as a model config would set them."""
    from clipmill.components.register.clip_pyfunc import ClipEmbeddingModel, model_limits

    served = ClipEmbeddingModel()
    served.clip = load_clip(str(tiny_model(tmp_path / "model", seed=5)))
    served.limits = model_limits(limits)
    return served


def rejected(served, frame) -> str:
    """The message of the 400 the scoring server would answer ``frame`` with."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as bad:
        served.predict(None, pd.DataFrame(frame))
    assert bad.value.get_http_status_code() == 400 and bad.value.error_code == "INVALID_PARAMETER_VALUE"
    return bad.value.message


def test_bad_requests_to_the_served_model_are_rejected_with_one_message(tmp_path):
    served = model_with_limits(tmp_path, max_rows=3, max_caption_chars=20, max_image_bytes=20000,
                               max_image_pixels=2500)
    small = base64.b64encode(png((30, 60, 220), seed=1, size=32)).decode()
    ok = served.predict(None, pd.DataFrame({"image": [small, None], "text": [None, "a blue square"]}))
    assert ok["image_embedding"][0] is not None and ok["text_embedding"][1] is not None

    assert "row 1 has neither 'image' nor 'text'" in rejected(served, {"text": ["a", None]})
    assert "unknown input columns ['caption']" in rejected(served, {"caption": ["a blue square"]})
    assert "row 0: image string is not base64" in rejected(served, {"image": ["not an image!"]})
    assert "row 0: image bytes are not a decodable image" in rejected(
        served, {"image": [base64.b64encode(b"<html>nope</html>").decode()]})
    assert "row 0: text has 21 characters, more than the limit of 20" in rejected(served, {"text": ["x" * 21]})
    assert "request has 4 rows, more than the limit of 3" in rejected(served, {"text": ["a"] * 4})
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 60, 220)).save(buf, format="PNG")  # 4096 pixels in a few hundred bytes
    big = base64.b64encode(buf.getvalue()).decode()
    assert "row 0: image is 64x64 pixels, more than the limit of 2500" in rejected(served, {"image": [big]})
    noisy = png((30, 60, 220), seed=1, size=96)  # a noisy PNG of about 27 kB
    assert "the limit of 20000 bytes" in rejected(served, {"image": [base64.b64encode(noisy).decode()]})
    assert f"row 0: image has {len(noisy)} bytes, more than the limit of 20000 bytes" in rejected(
        served, {"image": [noisy]})
    assert "image array must be HxW or HxWxC" in rejected(served, {"image": [[1, 2, 3]]})


def invocation(port: int, body: dict) -> urllib.request.Request:
    return urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def test_served_champion_answers_embedding_requests(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    model = tiny_model(tmp_path / "model", seed=4)
    write_record(model, tmp_path / "metrics.json", policy_metrics(0.4))
    write_eval_suite(tmp_path / "eval")
    assert main(["stage", "register", "--params", str(REPO / "params.yaml"), "--model", str(model),
                 "--metrics", str(tmp_path / "metrics.json"), "--eval-dir", str(tmp_path / "eval"),
                 "--out", str(tmp_path / "register"), "--reports", str(tmp_path / "reports")]) == 0

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/clipmill@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    # the scoring server runs `uvicorn` from PATH: the venv's, as with an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri,
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    image = png((30, 60, 220), seed=3)
    body = {"dataframe_records": [{"text": "a blue square"}, {"image": base64.b64encode(image).decode()}]}
    with running_server(cmd, f"http://127.0.0.1:{port}/ping", env, tmp_path / "serve.log"):
        with urllib.request.urlopen(invocation(port, body), timeout=60) as response:
            predictions = json.load(response)["predictions"]
        for record, message in (({"image": "not an image!"}, "row 0: image string is not base64"),
                                ({"caption": "a blue square"}, "unknown input columns ['caption']"),
                                ({"image": None, "text": None}, "row 0 has neither 'image' nor 'text'"),
                                ({"text": "x" * 1001}, "row 0: text has 1001 characters, more than the limit")):
            with pytest.raises(urllib.error.HTTPError) as bad:
                urllib.request.urlopen(invocation(port, {"dataframe_records": [record]}), timeout=60)
            answer = json.loads(bad.value.read().decode())
            assert bad.value.code == 400 and message in answer["message"], answer
            assert "stack_trace" not in answer and "Traceback" not in answer["message"]

    source = load_clip(str(model))
    assert predictions[0]["image_embedding"] is None and predictions[1]["text_embedding"] is None
    assert torch.tensor(predictions[0]["text_embedding"]) == pytest.approx(
        embed_texts(source, ["a blue square"])[0], abs=1e-5)
    assert torch.tensor(predictions[1]["image_embedding"]) == pytest.approx(embed_images(source, [image])[0], abs=1e-5)
