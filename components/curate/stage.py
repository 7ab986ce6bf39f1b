"""The curate stage: the declared steps (``components/common/curation.py``) over every download shard, step by step.

For each step in order: a per-sample step runs on every shard; a pool step maps every shard, combines the
partials into its state, and decides every shard. Each output is written once per shard with a completion
marker, so a rerun skips finished shards and a killed run resumes; shards whose input is unchanged are never
recomputed, and a step's per-sample work is reused for samples it has seen with the same params.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pandas as pd
import pyarrow as pa

from clipmill.components.common.curation import (
    STEPS_DIR,
    UNITS_DIR,
    load_state,
    output_path,
    read_marker,
    save_state,
    split_manifest,
    step_classes,
    step_dir,
    step_params,
    stored_state_hash,
    unit_fingerprint,
)
from clipmill.components.common.errors import ClipmillError, InputError
from clipmill.components.common.funnel import funnel_metrics
from clipmill.components.common.hashing import hash_obj, params_dump
from clipmill.components.common.io import check_stage_dir
from clipmill.components.common.log import get_logger
from clipmill.components.common.steps import PoolStep, Step, StepContext
from clipmill.components.common.storage import (
    is_url,
    location,
    read_frame,
    read_json_object,
    read_table,
    relative,
    remove,
    remove_tree,
    write_json,
    write_table,
)
from clipmill.components.common.tracking import stage_run, tracking_uri

from .executor import Executor, UnitTask, start_worker_server

log = get_logger("curate")

# Seconds of this run (split, each step, each phase): beside the outputs, not in them, since the outputs must
# not depend on how long a run took (dvc.yaml does not track it; MLflow records it).
TIMINGS_FILE = "timings.json"
# Per pool step, beside the outputs (a record that only ever saves a combine, never decides one): the shards its
# last combine saw with their map fingerprints, and in the file's metadata the params, context and method it ran
# with and the hash of the state it made. A rerun with the same of all uses the stored state as it is; one that
# only adds shards may add them to it (``PoolStep.combine_more``).
COMBINED_DIR = "combined"
COMBINE_RECORD = "clipmill.combine"  # the record's schema metadata key
LEGACY_FILES = ("combined.json",)  # what earlier versions kept beside the outputs: removed on the next run
READ_THREADS, READ_AHEAD = 2, 4  # a combine's reads of the stored partials and map outputs
CURATION_ENTRIES = (UNITS_DIR, STEPS_DIR, "summary.json", TIMINGS_FILE, COMBINED_DIR, *LEGACY_FILES)  # all it holds


def _fingerprints(step: type[Step], params, context: StepContext, phase: str, inputs: dict[str, str],
                  state_hash: str | None = None) -> dict[str, str]:
    """Fingerprints of ``phase``'s outputs per unit, from its inputs' fingerprints (and the state it reads)."""
    step_fp = step.fingerprint(params, context, phase)
    return {unit: hash_obj([step_fp, fp, state_hash]) for unit, fp in inputs.items()}


def _tasks(curate_dir: Path, step: type[Step], params, context: StepContext, phase: str,
           fingerprints: dict[str, str], upstream: tuple, state_hash: str | None = None) -> list[UnitTask]:
    return [UnitTask(str(curate_dir), step.name, params, context, unit, phase, fp, upstream, state_hash)
            for unit, fp in fingerprints.items()]


def _frames(curate_dir: Path, step: str, phase: str, units: list[str]) -> Iterator[pd.DataFrame]:
    """``step``'s ``phase`` outputs of ``units``, in unit order, read ``READ_AHEAD`` files ahead on ``READ_THREADS``
    threads (a parquet read releases the GIL): a combine's pass over 240 small partials took 0.40 s read one after
    another, 0.24 s so. At most ``READ_AHEAD`` frames wait beside the one the combine holds."""
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="curate-read") as pool:
        ahead: deque = deque()
        for unit in units:
            ahead.append(pool.submit(read_frame, output_path(curate_dir, step, unit, phase)))
            if len(ahead) > READ_AHEAD:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def step_summary(curate_dir: Path, step: type[Step], params, units: list[str], markers: list[dict]) -> dict:
    """The step's funnel counts over every shard (from its decision ``markers``, in unit order) plus the step's
    own summary fields."""
    dropped: dict[str, int] = {}
    for marker in markers:
        for reason, n in marker["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    summary = {"step": step.name, "section": step.section, "input": sum(m["input"] for m in markers),
               "kept": sum(m["kept"] for m in markers), "dropped": dict(sorted(dropped.items())),
               "shards": len(units)}
    if summary["kept"] + sum(dropped.values()) != summary["input"]:
        raise AssertionError(f"curation step {step.name} does not add up: {summary}")
    extra = step.summarize(params, [marker["summary"] for marker in markers], str(step_dir(curate_dir, step.name)))
    return {**summary, **extra}


def _remove_stale(curate_dir: Path, names: list[str], units: list[str]) -> None:
    """Outputs of steps no longer listed, and of shards no longer in the download, go."""
    steps_root = curate_dir / STEPS_DIR
    if not steps_root.is_dir():
        return
    keep = set(units)
    for folder in steps_root.iterdir():
        if folder.is_dir() and folder.name not in names:
            remove_tree(folder)
            continue
        for marker in folder.rglob("*.done"):  # every unit output has a marker; state and summaries do not
            parts = relative(marker, folder)[:-len(".done")].split("/")
            unit = "/".join(parts[1:] if parts[0] in ("map", "partial") else parts)
            if unit not in keep:
                remove(marker)
                remove(marker.with_suffix(".parquet"))


def _phase(timings: dict, step: str, phase: str) -> dict | None:
    """The last run's timing of ``step``'s ``phase``, if it is a well-formed one (the file is not an output: a
    hand-edited or truncated one only costs the choice of where a phase runs)."""
    found = timings.get(step, {}) if isinstance(timings, dict) else {}
    found = found.get("phases", {}) if isinstance(found, dict) else {}
    found = found.get(phase) if isinstance(found, dict) else None
    numbers = ("ran", "task_seconds", "worker_startup_seconds")
    if not isinstance(found, dict) or not all(isinstance(found.get(k, 0.0), (int, float)) for k in numbers):
        return None
    return found


def _combined_state(curate_dir: Path, step: type[PoolStep], section, context: StepContext, mapped: dict[str, str],
                    units: list[str]) -> tuple[str, str]:
    """Combine the partials of a pool step into its stored state; returns the state's hash and how it was made
    (``stored``, ``added`` or ``whole``).

    A combine is a pure function of the step's params, its ``combine_method``, the context and the map outputs (their
    fingerprints, per shard): when those and the stored state are what the last combine saw and made (a rerun that
    changed only a later step, or nothing), the stored state is used as it is. When only shards were added (every
    shard of the last combine is there with the same map output) and the stored state is the one it made, the
    step's ``combine_more`` adds the new shards to it (``added``), if the step can; else the whole pool is combined.
    """
    base = hash_obj({"step": step.name, "params": params_dump(section), "context": asdict(context),
                     "method": step.combine_method})
    stored_hash = stored_state_hash(curate_dir, step.name)
    before = _combined_maps(curate_dir, step.name, base, stored_hash) if stored_hash else None
    if before is not None and list(before.items()) == list(mapped.items()):
        log.info("%s: combined state unchanged (same params and map outputs)", step.name)
        return stored_hash, "stored"
    partials = partial(_frames, curate_dir, step.name, "partial", units)
    maps = partial(_frames, curate_dir, step.name, "map", units)
    state, how = None, "whole"
    if before and len(before) < len(mapped) and all(mapped.get(unit) == fp for unit, fp in before.items()):
        previous, _ = load_state(curate_dir, step.name)
        state = step.combine_more(section, previous, partials, maps, [unit not in before for unit in units])
        if state is not None:
            how = "added"
            log.info("%s: %d new shard(s) added to the state of %d", step.name, len(mapped) - len(before),
                     len(before))
    if state is None:
        state = step.combine(section, partials, maps)
    state_hash = save_state(curate_dir, step.name, state)
    seen = pa.table({"unit": list(mapped), "fingerprint": list(mapped.values())})
    write_table(seen.replace_schema_metadata({COMBINE_RECORD: json.dumps({"base": base, "hash": state_hash})}),
                curate_dir / COMBINED_DIR / f"{step.name}.parquet")
    return state_hash, how


def _combined_maps(curate_dir: Path, step: str, base: str, state_hash: str) -> dict[str, str] | None:
    """unit -> map fingerprint of every shard that the combine of ``step`` which made the state ``state_hash`` with
    the params, context and method ``base`` saw; None when no such combine is recorded (none, another's,
    unreadable)."""
    try:
        seen = read_table(curate_dir / COMBINED_DIR / f"{step}.parquet")
        made = json.loads((seen.schema.metadata or {}).get(COMBINE_RECORD.encode(), b"null"))
    except (OSError, ValueError, pa.ArrowException):  # a record beside the outputs: it only ever saves work
        return None
    if made != {"base": base, "hash": state_hash} or seen.column_names != ["unit", "fingerprint"]:
        return None
    return dict(zip(seen.column("unit").to_pylist(), seen.column("fingerprint").to_pylist()))


def run_steps(curate_dir: Path, steps: list[type[Step]], params, context: StepContext, units: list[str],
              executor: Executor, timings: dict, previous: dict | None = None) -> list[dict]:
    """Every step over every unit, in order; returns the per-step summaries and fills ``timings`` (per step: its
    wall seconds and, per phase, the shards that ran and their seconds). ``previous`` is the last run's timings:
    the executor weighs running a phase in the driver against starting the pool's workers with them."""
    before = previous.get("steps", {}) if isinstance(previous, dict) else {}
    unit_fps = {unit: unit_fingerprint(curate_dir, unit) for unit in units}
    inputs = dict(unit_fps)  # fingerprints of each step's input rows, per unit
    columns_made: dict[str, list] = {unit: [] for unit in units}  # per unit: the columns earlier steps added
    upstream: tuple = ()
    summaries = []
    for step in steps:
        section = step_params(step, params)
        resources = step.resources(section)
        started = time.perf_counter()
        combined = None
        if issubclass(step, PoolStep):
            phases = {}
            mapped = _fingerprints(step, section, context, "map", inputs)
            phases["map"] = executor.run(_tasks(curate_dir, step, section, context, "map", mapped, upstream),
                                         resources, _phase(before, step.name, "map"))
            combine_started = time.perf_counter()
            state_hash, how = _combined_state(curate_dir, step, section, context, mapped, units)
            combined = {"how": how, "seconds": time.perf_counter() - combine_started}
            decided = _fingerprints(step, section, context, "decide", mapped, state_hash)
            phases["decide"] = executor.run(_tasks(curate_dir, step, section, context, "decide", decided, upstream,
                                                   state_hash), previous=_phase(before, step.name, "decide"))
        else:
            applied = _fingerprints(step, section, context, "apply", inputs)
            phases = {"apply": executor.run(_tasks(curate_dir, step, section, context, "apply", applied, upstream),
                                            resources, _phase(before, step.name, "apply"))}
        # The next step's input is the shard's rows that every step so far kept, with the columns they added: its
        # fingerprint follows from those alone, so a shard whose survivors did not change (a new shard moved a pool
        # state, not them; a step that drops nothing here was added or left out) is not redone downstream.
        markers = [read_marker(output_path(curate_dir, step.name, unit)) for unit in units]
        for unit, marker in zip(units, markers):
            if marker["kept_columns"] is not None:
                columns_made[unit].append(marker["kept_columns"])
            inputs[unit] = hash_obj([unit_fps[unit], marker["kept_uids"], columns_made[unit]])
        summary = step_summary(curate_dir, step, section, units, markers)
        timings["steps"][step.name] = {"wall_seconds": time.perf_counter() - started, "phases": phases,
                                       **({"combine": combined} if combined else {})}
        write_json(summary, step_dir(curate_dir, step.name) / "summary.json")
        log.info("%s: kept %d of %d (%s)", step.name, summary["kept"], summary["input"],
                 ", ".join(f"{k}={v}" for k, v in summary["dropped"].items()) or "nothing dropped")
        summaries.append(summary)
        made_by = step.fingerprint(section, context, "map" if issubclass(step, PoolStep) else "apply")
        upstream = upstream + ((step.name, tuple(step.columns), made_by if step.columns else None),)
    for before, after in zip(summaries, summaries[1:]):
        if after["input"] != before["kept"]:
            raise AssertionError(f"curation funnel does not add up: {before['step']} kept {before['kept']}, "
                                 f"{after['step']} got {after['input']}")
    return summaries


def curate(manifest_path: str | os.PathLike, shards_dir: str | os.PathLike, out_dir: str | os.PathLike, params,
           inputs: dict[str, str] | None = None) -> dict:
    """The download manifest and shards in; ``out_dir`` (laid out as ``components/common/curation.py`` says) and
    ``out_dir/summary.json`` out.

    ``out_dir/timings.json`` holds this run's seconds and ``out_dir/combined/`` what each pool step's state was
    combined from. ``params`` is the whole params.yaml (each step reads its
    own section; ``curate`` says which steps run and where); ``inputs`` are extra named inputs of steps
    (``bootstrap_model``; ``manifest``, the path that errors name, defaults to ``manifest_path``). Returns the
    summary.
    """
    # The driver streams many small tables: the system allocator gives freed memory back, so its peak stays flat
    # as the crawl grows (Arrow's default pool keeps what it once held).
    pa.set_memory_pool(pa.system_memory_pool())
    # Absolute: tasks may run in another working directory (the workers of a Ray cluster).
    manifest_path, out_dir = location(manifest_path), location(out_dir)
    check_stage_dir(out_dir, "a curation directory", CURATION_ENTRIES)  # before anything is written there
    names = params.curate.steps
    steps = step_classes(names)
    if params.curate.executor == "local" and params.curate.workers > 1:
        start_worker_server(worker_modules(steps), params.curate.workers)  # imports while this process works
    context = _step_context(params, manifest_path, shards_dir, inputs)
    for step in steps:  # a step that cannot run fails here, before any work
        step.check_params(step_params(step, params), context)
    sections = {"curate": params.curate.model_dump(mode="json"),
                **{s.section: step_params(s, params).model_dump(mode="json") for s in steps}}
    with stage_run("curate", params.tracking, sections, [manifest_path]) as run:
        started = time.perf_counter()
        units = split_manifest(manifest_path, out_dir)
        timings: dict = {"split_seconds": time.perf_counter() - started, "steps": {}}
        if not units:
            raise ClipmillError(f"{manifest_path}: no successful downloads to curate")
        check_shards_present(context.shards_dir, units, steps)
        _remove_stale(out_dir, list(names), units)
        for name in LEGACY_FILES:
            remove(out_dir / name)
        previous = _previous_timings(out_dir)
        server_seconds = previous.get("worker_server_seconds") if isinstance(previous, dict) else None
        with Executor(params.curate.executor, params.curate.workers, params.ray, worker_modules(steps),
                      server_seconds if isinstance(server_seconds, (int, float)) else None) as executor:
            summaries = run_steps(out_dir, steps, params, context, units, executor, timings, previous)
        if executor.measured_server_seconds is not None:
            timings["worker_server_seconds"] = executor.measured_server_seconds
        elif isinstance(server_seconds, (int, float)):  # a run that needed no worker keeps the last measure
            timings["worker_server_seconds"] = server_seconds
        samples = sum(read_marker(out_dir / UNITS_DIR / f"{u}.parquet")["rows"] for u in units)
        summary = {"shards": len(units), "samples": samples, "steps": summaries,
                   "kept": summaries[-1]["kept"] if summaries else samples}
        timings["wall_seconds"] = time.perf_counter() - started
        write_json(summary, out_dir / "summary.json")
        write_json(timings, out_dir / TIMINGS_FILE)
        if run is not None:
            _log_run(summary, timings)
    log.info("curate: %d samples in %d shards -> %d kept (%s) in %.1f s", samples, len(units), summary["kept"],
             " -> ".join(f"{s['step']} {s['kept']}" for s in summaries), timings["wall_seconds"])
    return summary


def check_shards_present(shards_dir: str, units: list[str], steps: list[type[Step]]) -> None:
    """Steps that read images (their ``needs`` name the shard) need each unit's tar: a shards directory or a tar
    that is not there is one input error before any step runs, not a traceback after every step before them.
    Local folders only: an object store's shards are found when they are read (a request per shard here)."""
    if not any("shard" in step.needs for step in steps) or is_url(shards_dir):
        return
    root = location(shards_dir)
    if not root.is_dir():
        raise InputError(root, "no such shards directory (the download stage's shards/, --shards)")
    missing = [unit for unit in units if not (root / f"{unit}.tar").is_file()]
    if missing:
        raise InputError(root / f"{missing[0]}.tar", f"no such shard: {len(missing)} of the {len(units)} shards "
                                                     "the manifest names are not in the shards directory")


def worker_modules(steps: list[type[Step]]) -> list[str]:
    """What the local pool's workers import before their first task: the steps' modules and their ``preload``."""
    return list(dict.fromkeys(name for step in steps for name in (step.__module__, *step.preload)))


def _previous_timings(out_dir) -> dict | None:
    """The last run's timings, if it left them (they only weigh where a phase runs, never what it outputs)."""
    return read_json_object(out_dir / TIMINGS_FILE)


def _step_context(params, manifest_path: Path, shards_dir: str | os.PathLike,
                  inputs: dict[str, str] | None) -> StepContext:
    """What every step sees: absolute input paths (tasks may run elsewhere) except the manifest, which is named in
    errors as the caller gave it."""
    return StepContext(shards_dir=str(location(shards_dir)), seed=params.project.seed,
                       tracking_uri=tracking_uri(params.tracking),
                       inputs={k: str(location(v)) if k != "manifest" else str(v)
                               for k, v in {"manifest": manifest_path, **(inputs or {})}.items()})


def run_metrics(summary: dict, timings: dict) -> dict[str, float]:
    """The MLflow metrics of a curation: the funnel, each step's numbers, and the wall and task seconds."""
    metrics = {"samples_in": summary["samples"], "samples_out": summary["kept"], "shards": summary["shards"],
               "wall_seconds": timings["wall_seconds"], "split_seconds": timings["split_seconds"]}
    for name, t in timings["steps"].items():
        metrics[f"{name}.wall_seconds"] = t["wall_seconds"]
        metrics.update({f"{name}.{phase}.{k}": v for phase, p in t["phases"].items()
                        for k, v in p.items() if k in ("ran", "task_seconds")})
        if "combine" in t:
            metrics[f"{name}.combine_seconds"] = t["combine"]["seconds"]
    for s in summary["steps"]:
        metrics.update({f"{s['step']}.{k}": v for k, v in funnel_metrics(s).items()
                        if k not in ("samples_in", "samples_out")})
        metrics.update({f"{s['step']}.{k}": v for k, v in s.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("input", "kept")})
    return metrics


def _log_run(summary: dict, timings: dict) -> None:
    import mlflow

    mlflow.log_metrics(run_metrics(summary, timings))
    mlflow.log_dict(summary, "summary.json")
    mlflow.log_dict(timings, TIMINGS_FILE)
