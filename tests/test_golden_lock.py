"""The demo reproduces its golden dvc.lock: `dvc repro` in a fresh clone gives every deterministic output the hash
the committed dvc.lock names.

The reproduction starts in the background when the session's tests are collected (tests/conftest.py), so it runs
beside the other tests; this test runs last and waits for it. A change that alters the demo's outputs on purpose
updates dvc.lock and tests/golden_files.tsv in the same commit (`make golden`, after `make demo`). Floating-point
results differ between CPU kinds (tests/golden.py says why): the golden of another kind lies in tests/golden/<kind>/
(`python -m tests.golden write --kind NAME` after `make demo` there), and a reproduction equals one of them.
"""
from __future__ import annotations

import os
import signal

import pytest

from tests import golden

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", sorted(golden.goldens()))
def test_golden_listings_match_the_committed_lock(kind):
    """Each golden's listings (tests/golden_files.tsv beside dvc.lock, golden_files.tsv in tests/golden/<kind>/) list
    exactly the compared directory outputs of its lock, and every golden names the same outputs."""
    lock, listings = golden.goldens()[kind]
    hashes = golden.lock_hashes(lock)
    dirs = {(o.stage, o.path) for o in golden.compared_outputs(golden.ROOT) if hashes.get(o, "").endswith(".dir")}
    listed = {(o.stage, o.path) for o in golden.compared_outputs(golden.ROOT)
              if hashes.get(o, "").endswith(".dir") and golden.golden_listing(o, listings)}
    assert dirs, f"{lock} has no directory outputs: is the demo's golden lock committed?"
    assert listed == dirs, f"stale {listings}: run `make golden` ({sorted(dirs - listed)})"
    assert hashes.keys() == golden.lock_hashes(golden.ROOT / "dvc.lock").keys()


@pytest.mark.timeout(3600)
def test_demo_reproduces_the_golden_lock(golden_reproduction):
    proc, clone, log = golden_reproduction
    try:
        rc = proc.wait(timeout=3300)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    assert rc == 0, f"dvc repro failed in {clone} (rc {rc}); its log: {log}\n" + log.read_text()[-3000:]
    kind, found = golden.check_goldens(clone)
    print(f"every deterministic output equals the golden dvc.lock of kind {kind!r}" if kind else "")
    assert kind, (f"the demo reproduces none of the golden locks (reproduction in {clone}, on {golden.cpu_kind()}):\n"
                  + "\n".join(f"against kind {k!r}:\n" + "\n".join(d) for k, d in found.items()))
