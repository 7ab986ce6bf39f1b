"""The demo reproduces its golden dvc.lock: `dvc repro` in a fresh clone gives every deterministic output the hash
the committed dvc.lock names.

The reproduction starts in the background when the session's tests are collected (tests/conftest.py), so it runs
beside the other tests; this test runs last and waits for it. A change that alters the demo's outputs on purpose
updates dvc.lock and tests/golden_files.tsv in the same commit (`make golden`, after `make demo`).
"""
from __future__ import annotations

import os
import signal

import pytest

from tests import golden

pytestmark = pytest.mark.slow


def test_golden_listings_match_the_committed_lock():
    """tests/golden_files.tsv lists exactly the compared directory outputs of dvc.lock."""
    hashes = golden.lock_hashes(golden.ROOT / "dvc.lock")
    listed = {(o.stage, o.path) for o in golden.compared_outputs(golden.ROOT)
              if hashes.get(o, "").endswith(".dir") and golden.golden_listing(o)}
    dirs = {(o.stage, o.path) for o in golden.compared_outputs(golden.ROOT) if hashes.get(o, "").endswith(".dir")}
    assert dirs, "dvc.lock has no directory outputs: is the demo's golden lock committed?"
    assert listed == dirs, f"stale tests/golden_files.tsv: run `make golden` ({sorted(dirs - listed)})"


@pytest.mark.timeout(3600)
def test_demo_reproduces_the_golden_lock(golden_reproduction):
    proc, clone, log = golden_reproduction
    try:
        rc = proc.wait(timeout=3300)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    assert rc == 0, f"dvc repro failed in {clone} (rc {rc}); its log: {log}\n" + log.read_text()[-3000:]
    diffs = golden.differences(clone, golden.ROOT / "dvc.lock")
    print("\n".join(diffs) or "every deterministic output equals the golden dvc.lock")
    assert not diffs, f"the demo does not reproduce the golden dvc.lock (reproduction in {clone}):\n" + "\n".join(diffs)
