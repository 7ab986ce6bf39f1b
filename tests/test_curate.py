"""The curate stage: the declared steps over every download shard; funnel, reruns, executors, resume, increments.

One download (6 shards) and one tiny scorer are shared by the module; the reference run curates them in this
process with the repo's params.yaml shrunk, and the other tests compare against its tables.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from clipmill.cli import main
from clipmill.components.common.curation import STEP_NAMES, read_step, read_step_table, step_class
from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.hashing import make_uid
from clipmill.components.common.model import create_clip, export_local_dir
from clipmill.components.common.params import RayParams, section_at
from clipmill.components.common.steps import PoolStep, StepContext
from clipmill.components.curate.executor import _PREPARED, DRIVER_DECISIONS, Executor, UnitTask, _build_key
from clipmill.components.curate.stage import curate
from clipmill.params import Params, load_params, parse_params
from tests.conftest import REPO
from tests.curation_fixtures import make_download


def shrunk_params(changes: dict | None = None) -> Params:
    """The repo's params.yaml, shrunk for the test fixtures (no MLflow, in this process, small images, small t);
    ``changes`` maps dotted keys (``curate.steps``) to values."""
    params = load_params(REPO / "params.yaml")
    defaults = {"tracking.enabled": False, "curate.workers": 0, "filter.min_image_side": 32, "score.device": "cpu",
                "balance.t": 5,
                "filter.near_duplicate_distance": None,  # one drawing per concept: all look alike
                "score.top_fraction": 0.7, "score.null_recall": None}  # a threshold that drops at any size
    for key, value in {**defaults, **(changes or {})}.items():
        section, _, field = key.rpartition(".")
        setattr(section_at(params, section), field, value)
    return params


def run_curate(download: dict, out: Path, params: Params, scorer: Path | None = None) -> dict:
    """The curate stage over a make_download output, as the CLI calls it."""
    inputs = {"bootstrap_model": scorer} if scorer is not None else {}
    return curate(download["manifest"], download["shards"], out, params, inputs)


def step_tables(out: Path, steps=STEP_NAMES) -> dict[str, pd.DataFrame]:
    return {step: read_step_table(out, step) for step in steps}


def assert_same_tables(got: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> None:
    assert list(got) == list(expected)
    for name, table in expected.items():
        pd.testing.assert_frame_equal(got[name], table, obj=name)


def shard_outputs(out: Path, under: str = ".") -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of every per-shard output and of its completion marker under ``out/under``, by path."""
    files = [f for marker in (out / under).rglob("*.done") for f in (marker, marker.with_suffix(".parquet"))]
    return {f.relative_to(out).as_posix(): (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(files)}


def counts_only(summary: dict) -> dict:
    """A stage summary without its timings."""
    return {k: counts_only(v) if isinstance(v, dict) else [counts_only(s) for s in v] if isinstance(v, list) else v
            for k, v in summary.items() if k not in ("seconds", "wall_seconds")}


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> dict:
    return make_download(tmp_path_factory.mktemp("download"), n=300, per_shard=50)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export_local_dir(create_clip("clipmill-tiny"), tmp_path_factory.mktemp("scorer") / "model")


@pytest.fixture(scope="module")
def reference(download, scorer, tmp_path_factory) -> dict:
    """Every step, in this process, from scratch."""
    out = tmp_path_factory.mktemp("reference") / "curate"
    summary = run_curate(download, out, shrunk_params(), scorer)
    return {"out": out, "summary": summary, "tables": step_tables(out)}


def copy_of(reference: dict, tmp_path: Path) -> Path:
    out = tmp_path / "curate"
    shutil.copytree(reference["out"], out)
    return out


def test_counts_add_up_along_the_funnel_and_every_drop_has_a_declared_reason(download, reference):
    summary, tables = reference["summary"], reference["tables"]
    successes = download["table"][download["table"]["status"] == "success"]
    assert summary["shards"] == 6 and summary["samples"] == len(successes) == 280
    assert summary == json.loads((reference["out"] / "summary.json").read_text())
    assert tables["rules"]["uid"].tolist() == successes["uid"].tolist()

    arriving = summary["samples"]
    for step in summary["steps"]:
        table = tables[step["step"]]
        assert step["input"] == arriving == len(table)
        assert step["kept"] + sum(step["dropped"].values()) == step["input"] and step["shards"] == 6
        assert table["keep"].sum() == step["kept"]
        assert table.loc[~table["keep"], "reason"].value_counts().to_dict() == step["dropped"]
        assert table.loc[table["keep"], "reason"].isna().all()
        declared = step_class(step["step"]).reasons
        assert all(r in declared or r.split(":")[0] in declared for r in step["dropped"]), step
        assert json.loads((reference["out"] / "steps" / step["step"] / "summary.json").read_text()) == step
        arriving = step["kept"]
    assert summary["kept"] == arriving > 0
    for name in ("rules", "dedup", "score", "balance"):  # every filtering step has something to do on this fixture
        assert (~tables[name]["keep"]).any(), name

    # Every sample either reaches the end or is dropped by exactly one step, with its reason.
    dropped = pd.concat([t.loc[~t["keep"], "uid"] for t in tables.values()])
    assert not dropped.duplicated().any()
    assert sorted([*dropped, *tables["rewrite"]["uid"]]) == sorted(successes["uid"])


def test_the_steps_summaries_add_up_what_their_whole_tables_say(reference):
    """Balance's entry counts after balancing, score's mean and rewrite's slots come from each shard's summary (made
    with its decision, kept in its marker): they equal what the whole decided tables give."""
    from clipmill.components.common.storage import read_frame

    steps, tables = {s["step"]: s for s in reference["summary"]["steps"]}, reference["tables"]
    balance = tables["balance"]
    kept = balance.loc[balance["keep"], "matched_entries"].explode().dropna().value_counts()
    counts = read_frame(reference["out"] / "steps" / "balance" / "entry_counts.parquet").set_index("entry")
    assert kept.sum() > 0 and counts["count_after"].to_dict() == kept.reindex(counts.index, fill_value=0).to_dict()
    assert steps["balance"]["expected_kept"] == pytest.approx(balance["keep_probability"].sum())
    assert steps["score"]["mean_clip_score"] == pytest.approx(tables["score"]["clip_score"].mean())
    rewrite = tables["rewrite"]
    assert steps["rewrite"]["rewrites"]["captions"] == len(rewrite)
    assert steps["rewrite"]["rewrites"]["kept"] == rewrite["rewrites"].map(len).sum()
    # a marker holds what differs by shard; the backend and model come from the params, once
    marker = json.loads(next((reference["out"] / "steps" / "rewrite").glob("*.done")).read_text())
    assert "kept" in marker["summary"] and not {"backend", "model", "rewrites_per_caption"} & set(marker["summary"])
    assert steps["rewrite"]["rewrites"]["backend"] == "rules"


def test_a_decision_marker_without_its_shards_summary_is_done_again(download, scorer, reference, tmp_path):
    """(as a curation of an earlier version, whose markers held none, is brought up to date)"""
    out = copy_of(reference, tmp_path)
    from clipmill.components.common.curation import marker_path, output_path, units_of

    marker = marker_path(output_path(out, "score", units_of(out)[0]))
    stale = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in stale.items() if k != "summary"}))
    summary = run_curate(download, out, shrunk_params(), scorer)
    assert json.loads(marker.read_text()) == stale
    assert counts_only(summary) == counts_only(reference["summary"])


def test_a_rerun_skips_every_finished_shard(download, scorer, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    before = shard_outputs(out)
    pool = sum(issubclass(step_class(name), PoolStep) for name in STEP_NAMES)
    # a file and its marker per shard: the unit, per-sample steps' decisions, pool steps' map, partial and decision
    assert len(before) == 2 * 6 * (1 + (len(STEP_NAMES) - pool) + 3 * pool)
    summary = run_curate(download, out, shrunk_params(), scorer)
    assert shard_outputs(out) == before
    assert counts_only(summary) == counts_only(reference["summary"])


def test_a_file_damaged_after_its_marker_is_done_again_to_the_same_bytes(download, scorer, reference, tmp_path,
                                                                         monkeypatch):
    """A data file cut short after its marker was written (a unit, a decision, a map output, a partial, a pool
    state's frame) does not count as finished: the rerun redoes that shard or that combine alone, and every output
    ends byte for byte as before."""
    out = copy_of(reference, tmp_path)
    before = shard_outputs(out)
    damaged = ["units/00002.parquet", "steps/rules/00001.parquet", "steps/balance/map/00003.parquet",
               "steps/dedup/partial/00004.parquet", "steps/balance/state/counts.parquet"]
    for name in damaged:
        path = out / name
        assert path.is_file(), name
        path.write_bytes(path.read_bytes()[:100])
    combined = []
    monkeypatch.setattr(step_class("balance"), "combine", classmethod(
        lambda cls, *args, _real=step_class("balance").combine: combined.append(cls.name) or _real(*args)))
    summary = run_curate(download, out, shrunk_params(), scorer)
    after = shard_outputs(out)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    redone = sorted(k for k in after if after[k][0] != before[k][0] and k.endswith(".parquet"))
    assert redone == sorted(["units/00002.parquet", "steps/rules/00001.parquet",
                             "steps/balance/map/00003.parquet", "steps/balance/partial/00003.parquet",
                             "steps/dedup/map/00004.parquet", "steps/dedup/partial/00004.parquet"])
    assert combined == ["balance"]  # its stored state could not be read; dedup's partial came back the same
    assert counts_only(summary) == counts_only(reference["summary"])
    assert_same_tables(step_tables(out), reference["tables"])


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("executor", ["process_pool", "ray"])
def test_a_process_pool_and_ray_give_the_same_tables(executor, download, scorer, reference, tmp_path, request):
    if executor == "ray":
        request.getfixturevalue("local_ray")
        params = shrunk_params({"curate.executor": "ray"})
    else:
        params = shrunk_params({"curate.workers": 2})
    summary = run_curate(download, tmp_path / "curate", params, scorer)
    assert_same_tables(step_tables(tmp_path / "curate"), reference["tables"])
    assert counts_only(summary) == counts_only(reference["summary"])


def test_the_driver_runs_a_single_task_and_small_decision_phases_itself(tmp_path):
    def tasks(phase: str, n: int) -> list[UnitTask]:
        return [UnitTask(str(tmp_path), "score", {}, StepContext(shards_dir=str(tmp_path)), f"crawl/{i:05d}", phase,
                         "fp", ()) for i in range(n)]

    with Executor("local", 2, RayParams()) as pool:
        assert pool.in_driver(tasks("map", 1)) and pool.in_driver(tasks("decide", DRIVER_DECISIONS))
        assert not pool.in_driver(tasks("map", 2)) and not pool.in_driver(tasks("decide", DRIVER_DECISIONS + 1))
        # The last run's timing of the phase: 1 s a task; a worker took 8 s to import, build and prepare the step.
        # The driver would pay those 8 s too: on two workers 8 + n / 2 s always wins.
        last = {"ran": 12, "task_seconds": 12.0, "worker_startup_seconds": 8.0}
        assert not pool.in_driver(tasks("map", 2), last)
        # Once the driver has prepared the step (it ran a task of it), n tasks take n s here: it wins up to 16.
        _PREPARED.add(_build_key(tasks("map", 1)[0]))
        assert pool.in_driver(tasks("map", 3), last) and pool.in_driver(tasks("map", 16), last)
        assert not pool.in_driver(tasks("map", 17), last)
        assert not pool.in_driver(tasks("map", 3), {"ran": 0, "task_seconds": 0.0, "worker_startup_seconds": 8.0})
        assert not pool.in_driver(tasks("map", 3), {"ran": 12, "task_seconds": 12.0})  # no start-up measured
    with Executor("local", 1, RayParams()) as here:
        assert here.in_driver(tasks("map", 100))


def test_until_the_worker_server_has_imported_a_phase_sent_to_the_pool_also_costs_that_wait(monkeypatch):
    """No worker starts before the server has imported every step's modules: a rerun's first, cheap phases run in
    the driver meanwhile (the last run measured the wait), but not a step that runs torch."""
    from clipmill.components.curate import executor as ex

    def tasks(step: str, n: int) -> list[UnitTask]:
        return [UnitTask("/nowhere", step, {}, StepContext(shards_dir="/nowhere"), f"crawl/{i:05d}", "apply", "fp", ())
                for i in range(n)]

    last = {"ran": 12, "task_seconds": 1.2, "worker_startup_seconds": 0.0}  # 0.1 s a task, nothing to start
    with Executor("local", 2, RayParams(), server_seconds=1e6) as pool:
        deadline = time.monotonic() + 120
        while not ex._SERVER["ready"]:  # until a worker ran: from here on, the pool waits for nothing
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not pool.in_driver(tasks("rules", 8), last)
        monkeypatch.setitem(ex._SERVER, "ready", False)  # as if the server were still importing
        assert pool.in_driver(tasks("rules", 8), last)
        assert not pool.in_driver(tasks("score", 8), last)  # the driver would import torch too
        pool.server_seconds = None  # no measure from the last run: the pool, as before
        assert not pool.in_driver(tasks("rules", 8), last)


def test_the_pools_workers_are_stopped_not_waited_for_when_the_executor_ends():
    """A worker that imported torch takes most of a second to unload it on exit, on every curation run: the
    executor ends its idle workers instead (each task's output is atomic, so that is always safe)."""
    import os
    import signal

    with Executor("local", 2, RayParams()) as pool:
        assert len({pool._pool.submit(os.getpid).result() for _ in range(4)}) >= 1
        workers = list(pool._pool._processes.values())
    assert workers and all(w.exitcode == -signal.SIGTERM for w in workers)


def test_the_pools_workers_fork_from_a_server_that_imported_the_steps_modules_and_preloads():
    """Each step's module and its ``preload`` (the scorer's torch and open_clip) are imported once, by the server
    the workers fork from. In a fresh process: a process has one such server, its imports fixed when it starts."""
    from clipmill.components.curate.stage import worker_modules
    from clipmill.components.score.step import ScoreStep

    modules = worker_modules([step_class(name) for name in STEP_NAMES])
    assert {"open_clip", ScoreStep.__module__, "py3langid.langid"} <= set(modules)
    assert len(modules) == len(set(modules))
    code = ("import sys\n"
            "from clipmill.components.common.params import RayParams\n"
            "from clipmill.components.curate.executor import Executor\n"
            "with Executor('local', 2, RayParams(), ['wave']) as pool:\n"
            "    in_worker = pool._pool.submit(eval, \"'wave' in __import__('sys').modules\").result()\n"
            "print(in_worker, 'wave' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]  # in the worker, not in the driver


def test_a_run_that_needed_no_worker_stops_the_server_instead_of_waiting_for_its_imports(tmp_path):
    """A run whose phases all ran in the driver (a no-op rerun, a rerun that only decides) used to end only once the
    server had imported torch and open_clip for nothing: the pool's shutdown waited on its first worker, and that
    worker on the server. The server is stopped instead (its slow import never finishes), and the next pool of the
    process starts a new server and runs on it."""
    (tmp_path / "slow_import.py").write_text(
        "import pathlib, time\n"
        f"time.sleep(20)\npathlib.Path({str(tmp_path / 'imported')!r}).write_text('done')\n")
    code = ("import os, sys\n"
            "from clipmill.components.common.params import RayParams\n"
            "from clipmill.components.curate.executor import _SERVER, Executor\n"
            "with Executor('local', 2, RayParams(), ['slow_import']) as pool:\n"
            "    pass\n"
            "print(_SERVER['ready'], _SERVER['started'])\n"
            "with Executor('local', 2, RayParams(), ['json']) as pool:\n"
            "    print(pool._pool.submit(os.getpid).result() != os.getpid())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "None", "True"]
    assert not (tmp_path / "imported").exists()  # a run that waited for the server would have seen it import


def test_a_rerun_weighs_the_driver_against_the_pool_with_the_last_runs_timings(download, scorer, reference, tmp_path):
    """A run on the pool records what a worker paid to start each phase; a rerun with new shards reads it, and
    outputs never depend on where a phase ran."""
    import json

    out = tmp_path / "curate"
    params = shrunk_params({"curate.workers": 2})
    run_curate(download, out, params, scorer)
    first = json.loads((out / "timings.json").read_text())
    score_map = first["steps"]["score"]["phases"]["map"]
    assert score_map["where"] == "pool" and score_map["worker_startup_seconds"] > 0
    # Shards of the score step to redo: one (the driver runs a single task, and so prepares the step), then two
    # under last timings that make the driver cheaper now that it holds the scorer, then two that make the pool.
    for redo, startup, where in ((1, 1e6, "driver"), (2, 1e6, "driver"), (2, 0.0, "pool")):
        first["steps"]["score"]["phases"]["map"]["worker_startup_seconds"] = startup
        (out / "timings.json").write_text(json.dumps(first))
        for marker in sorted((out / "steps" / "score" / "map").rglob("*.done"))[:redo]:
            marker.unlink()
        run_curate(download, out, params, scorer)
        rerun = json.loads((out / "timings.json").read_text())["steps"]["score"]["phases"]["map"]
        assert (rerun["ran"], rerun["where"]) == (redo, where)
        assert_same_tables(step_tables(out), reference["tables"])


def test_the_driver_imports_torch_only_to_score_shards_itself(download, scorer, reference, tmp_path):
    """The curate process decides from stored scores without torch (seconds of import); when it scores a shard
    itself, it imports torch with a pool worker's share of threads, and the scores are the pool's."""
    out = copy_of(reference, tmp_path)
    params = shrunk_params({"curate.workers": 2})
    for marker in sorted((out / "steps" / "score" / "map").rglob("*.done"))[:1]:
        marker.unlink()  # a single task: the driver runs it
    args = cli_args(write_params(tmp_path / "params.yaml", params), download, scorer, out)
    probe = ("import json, sys; from clipmill.cli import main; rc = main(json.loads(sys.argv[1])); "
             "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")

    def curate_process(args: list[str]) -> dict:
        done = subprocess.run([sys.executable, "-c", probe, json.dumps(args)], capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert curate_process(args) == {"rc": 0, "torch": True}
    rerun = json.loads((out / "timings.json").read_text())["steps"]["score"]["phases"]["map"]
    assert (rerun["ran"], rerun["where"]) == (1, "driver")
    assert_same_tables(step_tables(out), reference["tables"])
    assert curate_process(args) == {"rc": 0, "torch": False}  # every shard finished
    # Another threshold: the driver decides every shard again from the stored scores, still without torch.
    other = cli_args(write_params(tmp_path / "other.yaml", shrunk_params({"curate.workers": 2,
                                                                         "score.top_fraction": 0.6})),
                     download, scorer, out)
    assert curate_process(other) == {"rc": 0, "torch": False}
    score = json.loads((out / "timings.json").read_text())["steps"]["score"]["phases"]
    assert score["map"]["ran"] == 0 and 0 < score["decide"]["ran"] <= DRIVER_DECISIONS
    assert score["decide"]["where"] == "driver"


def write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def cli_args(params_file: Path, download: dict, scorer: Path, out: Path) -> list[str]:
    return ["stage", "curate", "--params", str(params_file), "--manifest", str(download["manifest"]),
            "--shards", str(download["shards"]), "--bootstrap-model", str(scorer), "--out", str(out)]


def test_a_killed_run_resumes_to_the_same_outputs(download, scorer, reference, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", shrunk_params())
    out = tmp_path / "curate"
    args = cli_args(params_file, download, scorer, out)
    with open(tmp_path / "killed.log", "wb") as log:
        run = subprocess.Popen([sys.executable, "-m", "clipmill.cli", *args], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        # Killed once the scorer has finished a shard or two: earlier steps are complete, score is half done.
        while not list((out / "steps" / "score" / "map").glob("*.done")):
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert run.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (out / "summary.json").exists()
    assert 0 < len(list((out / "steps" / "score" / "map").glob("*.done"))) < 6

    assert main(args) == 0
    assert_same_tables(step_tables(out), reference["tables"])
    assert counts_only(json.loads((out / "summary.json").read_text())) == counts_only(reference["summary"])


def test_a_new_shard_is_curated_incrementally(download, scorer, reference, tmp_path):
    """Shards 0-4 first, then the download grows by shard 5: the result equals the from-scratch reference."""
    table = download["table"]
    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in sorted(download["shards"].glob("*.tar"))[:5]:
        shutil.copy(tar, shards)
        shutil.copy(tar.with_suffix(".parquet"), shards)  # img2dataset's table of the shard
    first = {"manifest": tmp_path / "first.parquet", "shards": shards}
    table[table["shard"] != "00005.tar"].to_parquet(first["manifest"], index=False)
    out = tmp_path / "curate"
    run_curate(first, out, shrunk_params(), scorer)
    scored = shard_outputs(out, "steps/score/map")
    assert len(scored) == 2 * 5

    shutil.copy(download["shards"] / "00005.tar", shards)
    shutil.copy(download["shards"] / "00005.parquet", shards)
    grown = {"manifest": tmp_path / "grown.parquet", "shards": shards}
    table.to_parquet(grown["manifest"], index=False)
    summary = run_curate(grown, out, shrunk_params(), scorer)

    # The scores of the first shards were neither recomputed nor rewritten; the new shard has its own.
    now = shard_outputs(out, "steps/score/map")
    assert {k: v for k, v in now.items() if k in scored} == scored
    assert set(now) - set(scored) == {"steps/score/map/00005.parquet", "steps/score/map/00005.done"}
    assert_same_tables(step_tables(out), reference["tables"])
    assert counts_only(summary) == counts_only(reference["summary"])
    entry_counts = "steps/balance/entry_counts.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(out / entry_counts), pd.read_parquet(reference["out"] / entry_counts))


@pytest.mark.parametrize("where", ["after", "before", "another-record"])
def test_a_new_shards_near_duplicates_are_added_to_the_stored_state(download, scorer, tmp_path, where):
    """With near-duplicates on, a new shard (after the first shards in unit order, or before them) is added to the
    stored state rather than banding every shard again, and the result equals a from-scratch curation. A record of
    the shards a combine saw that names another state than the stored one is not trusted: the pool is combined
    whole."""
    import pyarrow.parquet as pq

    params = shrunk_params({"filter.near_duplicate_distance": 0.025})
    table = download["table"].copy()
    shards = tmp_path / "shards"
    shards.mkdir()
    new = "00005.tar" if where == "after" else "0-new/00005.tar"  # unit 0-new/00005 sorts before 00000
    for tar in sorted(download["shards"].glob("*.tar")):
        name = new if tar.name == "00005.tar" else tar.name
        (shards / name).parent.mkdir(exist_ok=True)
        shutil.copy(tar, shards / name)
        shutil.copy(tar.with_suffix(".parquet"), (shards / name).with_suffix(".parquet"))
    table.loc[table["shard"] == "00005.tar", "shard"] = new
    grown = {"manifest": tmp_path / "manifest.parquet", "shards": shards}  # one path, as the download writes it
    table[table["shard"] != new].to_parquet(grown["manifest"], index=False)
    out = tmp_path / "curate"
    run_curate(grown, out, params, scorer)
    if where == "another-record":
        record = out / "combined" / "neardup.parquet"
        seen = pq.read_table(record)
        made = json.loads(seen.schema.metadata[b"clipmill.combine"])
        pq.write_table(seen.replace_schema_metadata({"clipmill.combine": json.dumps({**made, "hash": "0" * 64})}),
                       record)
    table.to_parquet(grown["manifest"], index=False)
    run_curate(grown, out, params, scorer)
    run_curate(grown, tmp_path / "scratch", params, scorer)

    how = json.loads((out / "timings.json").read_text())["steps"]["neardup"]["combine"]["how"]
    assert how == ("whole" if where == "another-record" else "added")
    tables = step_tables(out)
    assert (~tables["neardup"]["keep"].astype(bool)).sum() > 0
    assert_same_tables(tables, step_tables(tmp_path / "scratch"))
    for frame in ("losers", "pairs"):
        path = Path("steps/neardup/state") / f"{frame}.parquet"
        pd.testing.assert_frame_equal(pd.read_parquet(out / path), pd.read_parquet(tmp_path / "scratch" / path))


def test_steps_left_out_keep_what_they_would_drop(download, scorer, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    earlier = shard_outputs(out, "steps/score")
    summary = run_curate(download, out, shrunk_params({"curate.steps": ["rules", "dedup", "score", "rewrite"]}),
                         scorer)
    assert not (out / "steps" / "balance").exists()
    assert [s["step"] for s in summary["steps"]] == ["rules", "dedup", "score", "rewrite"]
    assert shard_outputs(out, "steps/score") == earlier  # the steps before the change were not redone

    score, rewrite = reference["tables"]["score"], read_step_table(out, "rewrite")
    assert rewrite["uid"].tolist() == score.loc[score["keep"], "uid"].tolist()
    assert rewrite["keep"].all() and summary["kept"] == len(rewrite)
    # Without balance no caption has matched entries: the guard has none to lose.
    counts = summary["steps"][-1]["rewrites"]
    assert counts["captions"] == len(rewrite) and "lost_entry" not in counts["dropped"]
    assert counts["kept"] == rewrite["rewrites"].map(len).sum() > 0


def test_a_step_added_to_the_list_reuses_the_later_steps_per_sample_work(download, scorer, reference, tmp_path):
    out = tmp_path / "curate"
    without = [name for name in STEP_NAMES if name != "spam"]
    run_curate(download, out, shrunk_params({"curate.steps": without}), scorer)
    scored = shard_outputs(out, "steps/score")
    run_curate(download, out, shrunk_params(), scorer)
    # spam drops nothing in this crawl: what reaches dedup, score and the rest is unchanged, so none of it is redone
    assert (~read_step_table(out, "spam")["keep"]).sum() == 0
    assert shard_outputs(out, "steps/score") == scored
    assert_same_tables(step_tables(out), reference["tables"])


def test_pool_steps_combine_again_only_when_their_params_or_map_outputs_changed(download, scorer, reference,
                                                                               tmp_path, monkeypatch):
    params = shrunk_params({"score.top_fraction": 0.6})
    run_curate(download, tmp_path / "scratch", params, scorer)
    out = copy_of(reference, tmp_path)
    combined = []
    for name in STEP_NAMES:
        step = step_class(name)
        if issubclass(step, PoolStep):
            monkeypatch.setattr(step, "combine", classmethod(
                lambda cls, *args, _real=step.combine: combined.append(cls.name) or _real(*args)))
    run_curate(download, out, shrunk_params(), scorer)
    assert combined == []  # nothing changed
    run_curate(download, out, params, scorer)
    assert combined == ["score", "balance"]  # score's threshold; balance's input (score's survivors)
    assert_same_tables(step_tables(out), step_tables(tmp_path / "scratch"))
    # Score's state and decisions as another run left them (a checkout of other outputs): the stored state is not
    # the one the last combine made, so it is combined again, and decided again from it.
    score_dir = out / "steps" / "score"
    shutil.copy(reference["out"] / "steps" / "score" / "state.json", score_dir / "state.json")  # the threshold
    for marker in score_dir.rglob("*.done"):
        if marker.relative_to(score_dir).parts[0] not in ("map", "partial"):
            marker.unlink()
    combined.clear()
    run_curate(download, out, params, scorer)
    assert combined == ["score"]
    assert_same_tables(step_tables(out), step_tables(tmp_path / "scratch"))


def test_a_changed_step_redoes_what_depends_on_it(download, scorer, reference, tmp_path):
    """Other metadata: balance matches again, and rewrite (whose paraphrases keep the matched entries) rewrites again
    ("background" is no longer matched, so the rules backend may say "backdrop")."""
    (tmp_path / "shapes.txt").write_text("circle\nsquare\ntriangle\n")
    params = shrunk_params({"balance.metadata": str(tmp_path / "shapes.txt")})
    out = copy_of(reference, tmp_path)
    earlier = shard_outputs(out, "steps/score")
    run_curate(download, out, params, scorer)
    run_curate(download, tmp_path / "scratch", params, scorer)
    assert shard_outputs(out, "steps/score") == earlier
    assert_same_tables(step_tables(out), step_tables(tmp_path / "scratch"))
    matched = read_step_table(out, "balance")["matched_entries"].map(list)
    assert matched.map(lambda m: set(m) <= {"circle", "square", "triangle"}).all()
    assert read_step_table(out, "rewrite")["rewrites"].map(lambda r: any("backdrop" in t for t in r)).any()


def test_a_shard_emptied_by_an_early_step_passes_every_later_step(download, scorer, reference, tmp_path):
    table = download["table"].copy()
    blank = table["shard"] == "00001.tar"
    table.loc[blank, "caption"] = "blank"  # one word: the rules drop the whole shard
    table.loc[blank, "uid"] = [make_uid(url, "blank") for url in table.loc[blank, "url"]]
    emptied = {"manifest": tmp_path / "emptied.parquet", "shards": download["shards"]}
    table.to_parquet(emptied["manifest"], index=False)
    out = copy_of(reference, tmp_path)
    summary = run_curate(emptied, out, shrunk_params(), scorer)

    assert set(dict(read_step(out, "rules", units=["00001"]))["00001"]["reason"]) == {"min_words"}
    for step in STEP_NAMES[1:]:
        assert dict(read_step(out, step, units=["00001"]))["00001"].empty, step
    kept = read_step_table(out, "rewrite")
    assert summary["kept"] == len(kept) > 0
    assert not set(kept["uid"]) & set(table.loc[blank, "uid"])


def test_a_manifest_missing_a_column_is_one_input_error(download, scorer, tmp_path, capsys):
    download["table"].drop(columns=["caption"]).to_parquet(tmp_path / "no_caption.parquet", index=False)
    broken = {**download, "manifest": tmp_path / "no_caption.parquet"}
    with pytest.raises(InputError, match=r"no_caption\.parquet: field 'caption': missing column"):
        run_curate(broken, tmp_path / "curate", shrunk_params(), scorer)
    assert not (tmp_path / "curate").exists()

    params_file = write_params(tmp_path / "params.yaml", shrunk_params())
    assert main(cli_args(params_file, broken, scorer, tmp_path / "curate")) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("no_caption.parquet: field 'caption': missing column")


def test_a_manifest_shard_outside_the_shards_directory_is_one_input_error(download, scorer, tmp_path):
    table = download["table"].copy()
    last = table.index[table["status"] == "success"][-1]
    table.loc[last, "shard"] = "../../evil.tar"  # a unit named after it would be written outside the curation
    table.to_parquet(tmp_path / "manifest.parquet", index=False)
    with pytest.raises(InputError, match=r"shard '\.\./\.\./evil\.tar' names a file outside the shards directory"):
        run_curate({**download, "manifest": tmp_path / "manifest.parquet"}, tmp_path / "a" / "b" / "curate",
                   shrunk_params(), scorer)
    assert not list(tmp_path.rglob("evil*"))


def test_an_out_dir_that_is_not_a_curation_is_refused_before_anything_is_written(download, scorer, tmp_path):
    other = tmp_path / "download"  # e.g. --out data/download by mistake: another stage's output
    other.mkdir()
    (other / "manifest.parquet").write_bytes(b"theirs")
    (other / "summary.json").write_text("{}")
    with pytest.raises(InputError, match=r"not part of a curation directory \(manifest.parquet\)") as err:
        run_curate(download, other, shrunk_params(), scorer)
    assert err.value.file == str(other)
    assert sorted(p.name for p in other.iterdir()) == ["manifest.parquet", "summary.json"]
    assert (other / "summary.json").read_text() == "{}"
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is a file"):
        run_curate(download, tmp_path / "notes.txt", shrunk_params(), scorer)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unknown_or_misordered_steps_are_config_errors():
    with pytest.raises(ConfigError, match=r"curate\.steps.*unknown step\(s\) \['sharpen'\]"):
        parse_params({"curate": {"steps": ["rules", "sharpen"]}})
    with pytest.raises(ConfigError, match=r"curate\.steps.*declared order"):
        parse_params({"curate": {"steps": ["score", "rules"]}})
    assert parse_params({"curate": {"steps": ["rules", "balance"]}}).curate.steps == ["rules", "balance"]


def test_the_cli_records_one_mlflow_run_with_per_step_metrics(download, scorer, reference, tmp_path, mlflow_uri):
    out = copy_of(reference, tmp_path)
    params = shrunk_params({"tracking.enabled": True, "tracking.tracking_uri": mlflow_uri})
    assert main(cli_args(write_params(tmp_path / "params.yaml", params), download, scorer, out)) == 0
    mlflow.set_tracking_uri(mlflow_uri)
    [run] = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert run.data.tags["clipmill.stage"] == "curate"
    metrics, steps = run.data.metrics, {s["step"]: s for s in reference["summary"]["steps"]}
    assert metrics["samples_in"] == 280 and metrics["samples_out"] == reference["summary"]["kept"]
    assert metrics["score.kept"] == steps["score"]["kept"]
    assert metrics["score.dropped.low_clip_score"] == steps["score"]["dropped"]["low_clip_score"]
    assert metrics["rules.dropped.min_words"] == steps["rules"]["dropped"]["min_words"]
    assert metrics["balance.tail_share"] == pytest.approx(steps["balance"]["tail_share"])
    assert run.data.params["curate.steps"] == str(list(STEP_NAMES)) and run.data.params["balance.t"] == "5"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)] == ["summary.json", "timings.json"]
    timings = json.loads((out / "timings.json").read_text())  # the run's seconds, beside the outputs
    assert set(timings["steps"]) == set(STEP_NAMES)
    assert metrics["wall_seconds"] == pytest.approx(timings["wall_seconds"])
    assert "seconds" not in (out / "summary.json").read_text()  # the outputs do not time the run


def test_curation_reads_and_writes_object_storage_like_local_files(download, scorer, reference, s3, tmp_path):
    s3.put(str(download["manifest"]), "crawl/download/manifest.parquet")
    s3.put(str(download["shards"]), "crawl/download/shards", recursive=True)
    params = shrunk_params()
    out = "s3://crawl/curate"
    summary = curate("s3://crawl/download/manifest.parquet", "s3://crawl/download/shards", out, params,
                     {"bootstrap_model": scorer})
    assert counts_only(summary) == counts_only(reference["summary"])
    assert_same_tables(step_tables(out), reference["tables"])
    assert json.loads(s3.cat("crawl/curate/summary.json")) == summary
    assert s3.exists("crawl/curate/steps/balance/entry_counts.parquet")

    # A rerun finds every shard finished (the markers on the store), and a lost marker redoes only its shard.
    s3.rm("crawl/curate/steps/rules/00003.done")
    again = curate("s3://crawl/download/manifest.parquet", "s3://crawl/download/shards", out, params,
                   {"bootstrap_model": scorer})
    assert counts_only(again) == counts_only(reference["summary"])
    timings = json.loads(s3.cat("crawl/curate/timings.json"))
    assert timings["steps"]["rules"]["phases"]["apply"]["ran"] == 1
    assert timings["steps"]["score"]["phases"]["map"]["ran"] == 0

    # Reshard reads the curation and the download shards from the store and publishes the curated shards there:
    # byte for byte what a local reshard of the local curation writes.
    from clipmill.components.reshard.curated import reshard

    steps = list(params.curate.steps)
    local = reshard(reference["out"], download["shards"], tmp_path / "curated", params.reshard, 0, params.tracking,
                    steps)
    remote = reshard(out, "s3://crawl/download/shards", "s3://crawl/curated", params.reshard, 0, params.tracking,
                     steps)
    assert remote == local
    assert s3.cat("crawl/curated/content_hash.txt").decode().strip() == local["content_hash"]
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.find("crawl/curated/shards")) == sorted(local["shard_sha256"])

    # Training reads the curated shards from the store (webdataset through fsspec) and checks their content hash
    # against the bytes reshard wrote: a changed object is refused before training.
    from clipmill.components.common.training.data import _read_shard, scan_shards

    local_set, remote_set = scan_shards(str(tmp_path / "curated")), scan_shards("s3://crawl/curated")
    assert remote_set.counts == local_set.counts and remote_set.paths[0].startswith("s3://crawl/curated/shards/")
    keys = [[s["__key__"] for s in _read_shard(p)] for p in (local_set.paths[0], remote_set.paths[0])]
    assert keys[0] == keys[1] and keys[0]
    first = remote_set.paths[0].removeprefix("s3://")
    data = bytearray(s3.cat(first))
    data[-2000] ^= 0xFF
    s3.pipe(first, bytes(data))
    with pytest.raises(InputError, match="content hash"):
        scan_shards("s3://crawl/curated")


FAULT_SEED = int(os.environ.get("CLIPMILL_FAULT_SEED", "7"))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["curate", "reshard"])
def test_a_stage_sigkilled_at_a_seeded_random_point_reruns_to_identical_outputs(stage, download, scorer, reference,
                                                                                tmp_path):
    """The stage's CLI is SIGKILLed (with its process group) at a random moment drawn from CLIPMILL_FAULT_SEED,
    anywhere from interpreter start to the end of its work, then run again: its outputs equal an uninterrupted
    run's (the curation tables; reshard's shards, manifest, content hash and summary, byte for byte)."""
    params = shrunk_params()
    params_file = write_params(tmp_path / "params.yaml", params)
    out = tmp_path / stage
    if stage == "curate":
        args = cli_args(params_file, download, scorer, out)
    else:
        args = ["stage", "reshard", "--params", str(params_file), "--curate", str(reference["out"]),
                "--shards", str(download["shards"]), "--out", str(out)]
    delay = random.Random(f"{FAULT_SEED}:{stage}").uniform(0.5, 12.0)
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "clipmill.cli", *args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), (tmp_path / "killed.log").read_text()[-3000:]

    assert main(args) == 0
    if stage == "curate":
        assert_same_tables(step_tables(out), reference["tables"])
        assert counts_only(json.loads((out / "summary.json").read_text())) == counts_only(reference["summary"])
    else:
        from clipmill.components.reshard.curated import reshard

        expected = tmp_path / "uninterrupted"
        reshard(reference["out"], download["shards"], expected, params.reshard,
                params.project.seed + params.reshard.seed_offset, params.tracking, list(params.curate.steps))
        assert _tree_bytes(out) == _tree_bytes(expected)
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary output left behind


def test_a_malformed_timings_file_only_costs_the_choice_of_where_a_phase_runs():
    from clipmill.components.curate.stage import _phase

    good = {"score": {"phases": {"map": {"ran": 3, "task_seconds": 2.0, "worker_startup_seconds": 8.0}}}}
    assert _phase(good, "score", "map")["ran"] == 3
    for bad in ([], {"score": []}, {"score": {"phases": {"map": "x"}}},
                {"score": {"phases": {"map": {"ran": "3", "task_seconds": 2.0}}}}):
        assert _phase(bad, "score", "map") is None
    assert _phase(good, "rules", "apply") is None


def test_a_failed_task_stops_the_pool_with_its_own_error_and_no_other(tmp_path):
    """When a task fails, the tasks not started are dropped and the workers stopped: the task's error is the one
    error shown (no traceback from the pool's thread about futures cancelled under it)."""
    code = ("from clipmill.components.common.params import RayParams\n"
            "from clipmill.components.common.steps import StepContext\n"
            "from clipmill.components.curate.executor import Executor, UnitTask\n"
            "if __name__ == '__main__':\n"
            "    tasks = [UnitTask('/nowhere', 'rules', {}, StepContext(shards_dir='/nowhere'), f'crawl/{i:05d}',\n"
            "                      'apply', 'fp', ()) for i in range(40)]\n"
            "    try:\n"
            "        with Executor('local', 2, RayParams()) as pool:\n"
            "            pool.run(tasks)\n"
            "    except FileNotFoundError as e:\n"
            "        print('raised', e)\n")
    script = tmp_path / "fail.py"
    script.write_text(code)
    for _ in range(4):  # the pool's thread ran into the cancelled futures in about 2 of 3 runs
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "/nowhere/units/crawl/" in out.stdout, out.stderr
        assert "Traceback" not in out.stderr and "InvalidStateError" not in out.stderr, out.stderr


def test_a_rows_fingerprint_tells_values_types_and_order_apart():
    import numpy as np

    from clipmill.components.common.curation import rows_fingerprint

    base = pd.DataFrame({"uid": ["a", "b"], "score": [0.5, np.nan], "entries": [["cat", "dog"], []],
                         "n": pd.array([1, None], dtype="Int64")})
    same = pd.DataFrame({"uid": ["a", "b"], "score": [0.5, float("nan")], "entries": [np.array(["cat", "dog"]), []],
                         "n": pd.array([1, None], dtype="Int64")}, index=[7, 9])  # the index is not content
    assert rows_fingerprint(base) == rows_fingerprint(same)
    changed = [base.assign(score=[0.5, 0.0]), base.assign(entries=[["dog", "cat"], []]), base.iloc[::-1],
               base.assign(n=[1.0, np.nan]), base.rename(columns={"n": "m"}), base[["n", "uid", "score", "entries"]],
               base.assign(uid=["a", "b\u00e9"]), base.iloc[:1]]
    prints = {rows_fingerprint(t) for t in changed}
    assert len(prints) == len(changed) and rows_fingerprint(base) not in prints


def test_missing_shards_are_one_input_error_before_any_step_runs(download, scorer, tmp_path):
    out = tmp_path / "curate"
    with pytest.raises(InputError, match=r"no such shards directory") as err:
        curate(download["manifest"], tmp_path / "nowhere", out, shrunk_params(), {"bootstrap_model": scorer})
    assert err.value.file == str(tmp_path / "nowhere")
    shards = tmp_path / "shards"
    shutil.copytree(download["shards"], shards)
    first = sorted(shards.rglob("*.tar"))[0]
    first.unlink()
    with pytest.raises(InputError, match=r"no such shard: 1 of the \d+ shards the manifest names") as err:
        curate(download["manifest"], shards, out, shrunk_params(), {"bootstrap_model": scorer})
    assert err.value.file == str(first)
    assert not (out / "steps").exists()  # no step ran
    # without a step that reads images the shards are not needed
    summary = curate(download["manifest"], tmp_path / "nowhere", tmp_path / "rules_only",
                     shrunk_params({"curate.steps": ["rules", "spam"]}))
    assert [s["step"] for s in summary["steps"]] == ["rules", "spam"]
