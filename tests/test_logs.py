"""Quiet, useful logs: a stage run outside a terminal shows no third-party notices and does show its progress."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import yaml

from tests.conftest import REPO
from tests.test_train_shapes import write_shape_evalsets, write_shape_shards

NOISE = ("💡 Tip", "litlogger", "exists and is not empty", "is deprecated", "No pretrained weights loaded",
         "Token authentication is enabled")


def _run(argv: list[str], cwd, **env: str) -> str:
    """A subprocess with stdout and stderr in one pipe (not a terminal, as under a flow); its whole output."""
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def test_a_training_stage_logs_progress_and_no_third_party_noise(tmp_path, default_params):
    write_shape_shards(tmp_path / "shards", shards=2, per_shard=32)
    write_shape_evalsets(tmp_path / "eval", per_class=2, retrieval_size=8)
    params = default_params.model_dump(mode="json")
    params["train"].update(batch_size=16, samples_per_epoch=64, epochs=2, num_workers=0, shuffle_buffer=16,
                           cpu_threads=1, checkpoint_every_n_steps=4, val_every_n_steps=0, log_every_n_steps=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _run([sys.executable, "-m", "clipmill", "stage", "train", "--params", "params.yaml", "--shards", "shards",
                "--eval-dir", "eval", "--out", "train"], tmp_path, CLIPMILL_PROGRESS_EVERY_S="0",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(REPO))
    assert [n for n in NOISE if n in out] == [], out
    assert re.search(r"clipmill\.progress: train: 4/8 steps, 64 samples, \d+ s elapsed, ETA \d+ s", out), out
    assert re.search(r"clipmill\.progress: train: 8/8 steps, 128 samples, \d+ s elapsed\n", out), out


def test_third_party_notices_are_dropped_and_our_own_warnings_kept(tmp_path):
    script = textwrap.dedent("""
        import logging, warnings
        from clipmill.components.common.log import get_logger, quiet_third_party
        quiet_third_party()
        from ray._private.authentication.authentication_token_setup import _warn_token_auth_enabled
        _warn_token_auth_enabled()
        logging.warning("No pretrained weights loaded for model 'clipmill-tiny'. Model initialized randomly.")
        warnings.warn_explicit("theirs is deprecated", FutureWarning, "lib.py", 1, module="somelib.utils")
        warnings.warn_explicit("theirs is deprecated too", DeprecationWarning, "lib.py", 1, module="otherlib")
        warnings.warn_explicit("ours: mind this", FutureWarning, "x.py", 1, module="clipmill.components.train.cli")
        logging.warning("a root warning of another kind")
        get_logger("test").warning("ours: a logged warning")
    """)
    out = _run([sys.executable, "-c", script], tmp_path, PYTHONPATH=str(REPO))
    assert [n for n in NOISE if n in out] == [], out
    assert "ours: mind this" in out and "ours: a logged warning" in out and "a root warning of another kind" in out
