"""The rule filter as curation steps: ``rules`` (per sample) and ``dedup`` (exact-duplicate images, pool-wide)."""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from clipmill.components.common.errors import InputError
from clipmill.components.common.steps import PoolStep, Step, decisions

from .rules import RULE_REASONS, rule_reasons

DUPLICATE_REASON = "duplicate_image"
COMBINE_BUCKETS = 8  # each partial row's bucket (its sha256's hash modulo this): a larger pool is spilled by it
COMBINE_MEMORY = 256 * 2**20  # bytes of partial rows the dedup combine holds at most (a bucket is split beyond)
ENTRY_BYTES = 256  # one partial row in pandas: the sha256 and uid strings with their pointers, count and bucket


class RulesStep(Step):
    """DataComp basic rules: caption words and characters, boilerplate captions, image side and aspect ratio."""

    name = "rules"
    section = "filter"
    reasons = RULE_REASONS
    needs = ("caption", "original_width", "original_height")

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        for column in ("original_width", "original_height"):
            if batch[column].isna().any():
                raise InputError(self.context.inputs.get("manifest", "manifest"),
                                 f"missing for successful download uid {batch['uid'][batch[column].isna()].iloc[0]!r}",
                                 field=column)
        return decisions(batch["uid"], rule_reasons(batch, self.params))


class DedupStep(PoolStep):
    """Exact-duplicate images (same sha256) across the whole pool: the smallest uid of each image is kept.

    Partial per shard: the smallest uid and the count per sha256; the state holds the winner of every sha256
    seen more than once (``filter.dedup_images: false`` keeps everything)."""

    name = "dedup"
    section = "filter"
    reasons = (DUPLICATE_REASON,)
    needs = ("sha256",)
    map_columns = {"sha256": pa.string()}
    _winners: tuple[dict, pd.Series] | None = None

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        return super().fingerprint({"dedup_images": params.dedup_images}, context, phase)

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.params.dedup_images and batch["sha256"].isna().any():
            raise InputError(self.context.inputs.get("manifest", "manifest"), f"missing for successful download uid "
                                         f"{batch['uid'][batch['sha256'].isna()].iloc[0]!r}", field="sha256")
        return batch[["uid", "sha256"]].reset_index(drop=True)

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        """Per sha256 of the shard: the smallest uid, how many samples have it, and its combine bucket."""
        ordered = mapped.sort_values(["sha256", "uid"], kind="stable")
        first = ordered.drop_duplicates("sha256")
        counts = ordered["sha256"].value_counts()
        return pd.DataFrame({"sha256": first["sha256"].to_numpy(), "uid": first["uid"].to_numpy(),
                             "count": counts.reindex(first["sha256"]).to_numpy(np.int64),
                             "bucket": (pd.util.hash_array(first["sha256"].to_numpy(object)) % COMBINE_BUCKETS)
                             .astype(np.int64)})

    @classmethod
    def combine(cls, params, partials: Callable[[], Iterator[pd.DataFrame]],
                mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        """The winner of every sha256 seen more than once. The partials are read once, spilled to files by their
        bucket, and worked through one bucket at a time (the driver holds an eighth of the pool's distinct images,
        and no more than COMBINE_MEMORY bytes of them: ``spilled_parts``)."""
        if not params.dedup_images:
            return {}
        with tempfile.TemporaryDirectory(prefix="clipmill-dedup-") as spill:
            winners = [repeated_winners([part]) for part in spilled_parts(partials, Path(spill))]
        return {"winners": pd.concat([repeated_winners([]), *winners], ignore_index=True)
                .sort_values("sha256", ignore_index=True)}

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        if "winners" not in state:
            return decisions(mapped["uid"], [None] * len(mapped))
        if self._winners is None or self._winners[0] is not state:  # indexed once per state and process
            self._winners = (state, state["winners"].set_index("sha256")["uid"])
        winner = self._winners[1].reindex(mapped["sha256"]).to_numpy()
        duplicate = pd.notna(winner) & (winner != mapped["uid"].to_numpy())
        return decisions(mapped["uid"], [DUPLICATE_REASON if d else None for d in duplicate])


def repeated_winners(partials: list[pd.DataFrame]) -> pd.DataFrame:
    """sha256 and winning (smallest) uid of every sha256 that ``partials`` count more than once, by sha256."""
    table = pd.concat(partials, ignore_index=True) if partials else pd.DataFrame(
        {"sha256": pd.Series(dtype=object), "uid": pd.Series(dtype=object), "count": pd.Series(dtype=np.int64)})
    table = table.sort_values(["sha256", "uid"], kind="stable")
    counts = table.groupby("sha256", sort=False)["count"].sum()
    first = table.drop_duplicates("sha256").set_index("sha256")["uid"]
    repeated = counts.index[counts.to_numpy() > 1]
    return pd.DataFrame({"sha256": repeated, "uid": first.reindex(repeated).to_numpy()}).sort_values(
        "sha256", ignore_index=True)


def spilled_parts(partials: Callable[[], Iterator[pd.DataFrame]], folder: Path,
                  memory: int | None = None) -> Iterator[pd.DataFrame]:
    """The partials' rows in parts that hold every row of their sha256s and fit in ``memory`` bytes (about: a part
    is a share of the hashes): one pass spills each row to the file of its bucket; a bucket too large is split
    again, by more bits of its hash, into parts of half the bound on average."""
    memory = COMBINE_MEMORY if memory is None else memory
    for path, rows in _spill(partials(), lambda t: t["bucket"].to_numpy(np.int64), folder, "bucket"):
        if rows * ENTRY_BYTES <= memory:
            yield _read_spill(path)
            path.unlink()
            continue
        parts = math.ceil(2 * rows * ENTRY_BYTES / memory)  # half the bound each, on average: room for the spread

        def finer(t: pd.DataFrame, parts: int = parts) -> np.ndarray:
            hashes = pd.util.hash_array(t["sha256"].to_numpy(object))
            return ((hashes // COMBINE_BUCKETS) % parts).astype(np.int64)

        for sub, _ in _spill(_spilled_pieces(path), finer, folder, path.stem):
            yield _read_spill(sub)
            sub.unlink()
        path.unlink()


def _spill(tables, key: Callable[[pd.DataFrame], np.ndarray], folder: Path,
           prefix: str) -> list[tuple[Path, int]]:
    """Each row of ``tables`` appended to the Arrow stream file of its ``key`` in ``folder``: (file, rows) by key."""
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    rows: dict[int, int] = {}
    try:
        for table in tables:
            keys = key(table)
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            order = np.argsort(keys, kind="stable")  # the rows of each key in one slice, in their order
            for mine in np.split(order, np.flatnonzero(np.diff(keys[order])) + 1) if len(order) else []:
                value = int(keys[mine[0]])
                if value not in writers:
                    writers[value] = pa.ipc.new_stream(str(folder / f"{prefix}-{value}.arrows"), arrow.schema)
                    rows[value] = 0
                writers[value].write_table(arrow.take(pa.array(mine)))
                rows[value] += len(mine)
    finally:
        for writer in writers.values():
            writer.close()
    return [(folder / f"{prefix}-{value}.arrows", rows[value]) for value in sorted(writers)]


def _read_spill(path: Path) -> pd.DataFrame:
    with pa.ipc.open_stream(path) as reader:
        return reader.read_all().to_pandas()


def _spilled_pieces(path: Path) -> Iterator[pd.DataFrame]:
    """A spill file's pieces as written (each at most one partial's rows), one at a time."""
    with pa.ipc.open_stream(path) as reader:
        for batch in reader:
            yield batch.to_pandas()
