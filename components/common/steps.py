"""The curation step contract: every curation step is a small unit over a batch of samples.

A step has a ``name`` (its funnel stage and output folder), the ``section`` of params.yaml that configures it,
the ``columns`` it adds (later steps and the curated samples' metadata see them; ``extra_columns`` stay in the
step's own table), and the drop ``reasons`` it may give. It is built once per worker from its params and
the ``StepContext``, and then handed the samples of one download shard at a time: the shard's manifest rows
that every earlier step kept, with the columns those steps added.

- A per-sample ``Step`` implements ``apply(batch)``: one row per input sample with ``uid``, ``keep``,
  ``reason`` (None when kept) and its ``columns``.
- A ``PoolStep`` needs the whole pool for its decision (duplicates, a top-fraction threshold, MetaCLIP
  counts), so it runs in three phases: ``map`` per shard (the per-sample work, e.g. scores or matches, and a
  small ``partial`` statistic), one ``combine`` of every shard's partial into a small ``state``, and a
  per-shard ``decide`` from the stored map output and the state. The expensive map output is never
  recomputed when only the state changes (new shards join the pool). A step whose state can take new shards
  without the whole pool's work again also implements ``combine_more`` (near-duplicates: only pairs with a new
  image are banded and checked); the stage uses it when the shards of the last combine are all still there with
  the same map outputs.

A decision (apply or decide) of a shard also gives the step's ``shard_summary`` of it, kept in its marker; the
step's ``summarize`` adds those up over every shard, so a summary never reads the decided tables again.

The ordered list of steps lives in ``components/common/curation.py``; the executor, reshard, the funnel, the
report and the boundary validation all read it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa

from .hashing import hash_obj, params_dump

DECISION_COLUMNS = ["uid", "keep", "reason"]


@dataclass(frozen=True)
class StepContext:
    """What a step may need besides its own params section: stage-level inputs and settings."""

    shards_dir: str                       # the download shards (images are read from them by shard and key)
    seed: int = 0                         # project.seed
    tracking_uri: str | None = None       # MLflow, for scorers named by a models:/ or runs:/ URI
    inputs: dict[str, str] = field(default_factory=dict)  # extra named inputs (e.g. bootstrap_model)


class Step:
    """A per-sample curation step (see the module docstring)."""

    name: ClassVar[str]
    section: ClassVar[str]
    columns: ClassVar[dict[str, pa.DataType]] = {}          # carried to later steps and into curated samples
    extra_columns: ClassVar[dict[str, pa.DataType]] = {}    # kept in the step's own table only (bookkeeping)
    reasons: ClassVar[tuple[str, ...]] = ()
    # Manifest columns the step reads (besides uid and the columns of earlier steps).
    needs: ClassVar[tuple[str, ...]] = ()
    # Its tasks run torch: a driver that runs them itself gives torch a pool worker's share of threads first.
    uses_torch: ClassVar[bool] = False
    # Modules whose import is most of the step's start-up, beside its own: the local pool's workers fork from a
    # server that imported them once.
    preload: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any, context: StepContext):
        self.params = params
        self.context = context

    @classmethod
    def fingerprint(cls, params: Any, context: StepContext, phase: str = "apply") -> str:
        """What the step's output depends on besides its input rows: its params section (a step whose output
        depends on the seed or on other inputs of ``context`` adds them)."""
        return hash_obj({"step": cls.name, "phase": phase, "params": params_dump(params)})

    @classmethod
    def resources(cls, params: Any) -> dict:
        """What one task of the step asks a Ray cluster for."""
        return {"num_cpus": 1}

    @classmethod
    def check_params(cls, params: Any, context: StepContext) -> None:
        """Raise a ConfigError/InputError before any work starts when the step cannot run (default: nothing)."""

    def prepare(self) -> None:
        """Load what the per-sample work needs (a model) before a process's first map or apply: a start-up
        cost of the step, not a shard's (default: nothing)."""

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError

    @classmethod
    def shard_summary(cls, params: Any, decided: pd.DataFrame) -> dict:
        """A small statistic (JSON values) of one shard's decided table, which ``summarize`` adds up: kept in the
        decision's marker, made where the decision is made (default: none)."""
        return {}

    @classmethod
    def summarize(cls, params: Any, shards: list[dict], out_dir: str) -> dict:
        """Extra summary fields (and extra files under ``out_dir``) from every shard's ``shard_summary``, in unit
        order (default: none)."""
        return {}

    @classmethod
    def expectations(cls, params: Any, table: pd.DataFrame, step_dir: str) -> list[tuple[str, pd.DataFrame, list]]:
        """The step's own Great Expectations checks, beside the ones every step's decisions get (unique uids, a
        declared reason for every drop): ``table`` is its decided table over every shard, ``step_dir`` holds its
        other files. Returns (table name, frame, [gx expectations]) per checked table; default: none."""
        return []


class PoolStep(Step):
    """A two-phase step: per-shard ``map`` + ``partial``, one ``combine``, per-shard ``decide``."""

    # Columns of the map output beside uid (a superset of what decide needs; the step's ``columns`` come from it).
    map_columns: ClassVar[dict[str, pa.DataType]] = {}
    # How ``combine`` makes its state where that is not fixed by its params (a version of the method): a state
    # stored by another method is combined again.
    combine_method: ClassVar[dict[str, Any]] = {}

    @classmethod
    def fingerprint(cls, params: Any, context: StepContext, phase: str = "apply") -> str:
        """As a step's, and a map's also holds its ``map_columns``: a map output stored with other columns is redone."""
        dump = params_dump(params)
        if phase == "map":
            dump = {**dump, "map_columns": sorted(cls.map_columns)}
        return super().fingerprint(dump, context, phase)

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Both phases on one batch as if it were the whole pool (for tests and tiny inputs)."""
        mapped = self.map(batch)
        partial = self.partial(mapped)
        state = type(self).combine(self.params, lambda: iter([partial]), lambda: iter([mapped]))
        return self.decide(mapped, state)

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Per-sample work: ``uid`` + ``map_columns``, one row per input row."""
        raise NotImplementedError

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        """A small statistic of one shard's map output."""
        raise NotImplementedError

    @classmethod
    def combine(cls, params: Any, partials: Callable[[], Iterator[pd.DataFrame]],
                mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        """Every shard's partial in (``partials()`` streams them, one shard at a time, as often as needed; and
        ``mapped()`` the map outputs, for a second pass); the state out (JSON values and small frames)."""
        raise NotImplementedError

    @classmethod
    def combine_more(cls, params: Any, previous: dict, partials: Callable[[], Iterator[pd.DataFrame]],
                     mapped: Callable[[], Iterator[pd.DataFrame]], fresh: Sequence[bool]) -> dict | None:
        """The state of the whole pool from ``previous``, the state ``combine`` made with the same params from the
        shards whose ``fresh`` flag is False (their map outputs unchanged since), and the partials and map outputs of
        all shards (``fresh`` flags each frame, in the order they are yielded): the work of the new shards, not the
        whole pool's again. It must equal ``combine`` over the whole pool; None has the stage call ``combine``
        (the default: a step that cannot add to its state, or a pool it cannot add to)."""
        return None

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        """``uid``, ``keep``, ``reason`` and the step's ``columns`` for one shard's map output."""
        raise NotImplementedError


def decisions(uids: Iterable, reasons: Iterable, **columns: Any) -> pd.DataFrame:
    """A step's output frame: uid, keep (reason is None), reason, then ``columns``."""
    reason = np.array([None if pd.isna(r) else r for r in reasons], dtype=object)  # NaN and None alike: kept
    keep = np.fromiter((r is None for r in reason), dtype=bool, count=len(reason))
    return pd.DataFrame({"uid": np.array(list(uids), dtype=object), "keep": keep, "reason": reason,
                         **{k: (list(v) if not hasattr(v, "to_numpy") else v.to_numpy()) for k, v in columns.items()}})


def check_output(step: type[Step], out: pd.DataFrame, batch: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """The step kept its promise: one row per input uid, in order, with the decision and its columns."""
    missing = [c for c in (*DECISION_COLUMNS, *columns) if c not in out.columns]
    if missing:
        raise TypeError(f"curation step {step.name!r} returned no column(s) {missing}")
    if len(out) != len(batch) or not (out["uid"].to_numpy() == batch["uid"].to_numpy()).all():
        raise TypeError(f"curation step {step.name!r} must return one row per input sample, in order "
                        f"(got {len(out)} rows for {len(batch)})")
    silent = ~out["keep"].astype(bool) & out["reason"].isna()
    if silent.any():
        raise TypeError(f"curation step {step.name!r} dropped uid {out['uid'][silent].iloc[0]!r} without a reason")
    unknown = set(out["reason"].dropna().astype(str)) - set(step.reasons)
    if step.reasons and any(not any(r == known or r.startswith(known + ":") for known in step.reasons)
                            for r in unknown):
        raise TypeError(f"curation step {step.name!r} gave undeclared reason(s) {sorted(unknown)[:3]}")
    return out.reset_index(drop=True)
