"""Tiny models, a tiny evaluation suite and loopback servers for the evaluate/register/serving tests.

Real open_clip models with random weights, real MLflow servers on 127.0.0.1; nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from clipmill.components.common.evaluation import EvaluationRecord, model_hash
from clipmill.components.common.model import create_clip, export_local_dir

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
TEMPLATES = ["a photo of a {} square.", "a {} square."]


def png(rgb: tuple[int, int, int], seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_eval_suite(out: Path, version: str = "test-1", per_class: int = 5) -> Path:
    """zeroshot.parquet (+ classes json), retrieval.parquet (2 captions per image) and suite.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    classes = list(COLORS)
    rows = [{"uid": f"z{c}{i}", "image": png(COLORS[name], 100 * c + i), "label": c, "class_name": name}
            for c, name in enumerate(classes) for i in range(per_class)]
    pd.DataFrame(rows).to_parquet(out / "zeroshot.parquet", index=False)
    (out / "zeroshot_classes.json").write_text(json.dumps({"classes": classes, "templates": TEMPLATES}))
    retrieval = [{"uid": f"r{c}{i}", "image": png(COLORS[name], 1000 + 10 * c + i),
                  "captions": [f"a {name} square number {i}", f"{name} colored tile"]}
                 for c, name in enumerate(classes) for i in range(3)]
    pd.DataFrame(retrieval).to_parquet(out / "retrieval.parquet", index=False)
    (out / "suite.json").write_text(json.dumps({"version": version, "sets": {}}))
    return out


def tiny_model(out: Path, seed: int = 0) -> Path:
    """A randomly initialised ``clipmill-tiny`` exported as an open_clip local-dir."""
    torch.manual_seed(seed)
    return export_local_dir(create_clip("clipmill-tiny"), out)


def write_record(model_dir: Path, path: Path, metrics: dict[str, float], suite_version: str = "test-1") -> Path:
    """An evaluation record for ``model_dir`` with chosen metrics (the policy tests pick the numbers)."""
    return EvaluationRecord(suite_version, model_hash(model_dir), metrics).write(path)


def policy_metrics(acc1: float, guard: float = 0.5) -> dict[str, float]:
    """The primary metric and the default guardrails of params.yaml."""
    return {"zeroshot/acc1": acc1, "zeroshot/mean_per_class_recall": guard,
            "retrieval/image_to_text_recall_at_5": guard, "retrieval/text_to_image_recall_at_5": guard}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_filter(api: str, kind: str) -> list[dict]:
    """All objects of ``kind`` (flow_runs, deployments, artifacts ...) through a Prefect server's REST API."""
    request = urllib.request.Request(f"{api}/{kind}/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@contextmanager
def running_server(cmd: list[str], ready_url: str, env: dict[str, str], log_path: Path, timeout_s: float = 240):
    """Start ``cmd`` in its own process group, wait until ``ready_url`` answers 200, always kill the group."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(ready_url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ready_url} not ready after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
