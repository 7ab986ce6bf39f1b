"""MetaCLIP balancing: matching semantics, keep probabilities, tail kept whole, head towards t, seeded draws."""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from clipmill.components.balance.balancing import keep_probabilities, uid_uniform
from clipmill.components.balance.matching import EntryMatcher, read_metadata
from clipmill.components.balance.params import DEFAULT_METADATA, BalanceParams
from clipmill.components.balance.step import BalanceStep
from clipmill.components.common.curation import read_step, read_step_table
from clipmill.components.common.errors import InputError
from clipmill.components.common.steps import StepContext
from clipmill.components.common.text import spaced_text
from clipmill.components.curate.stage import curate
from tests.test_curate import shrunk_params


def metaclip_plain_loop(text: str, entries: list[str]) -> list[int]:
    """MetaCLIP's reference matching: every spaced entry tested with `in` against the spaced text."""
    spaced = spaced_text(text)
    return [i for i, entry in enumerate(entries) if f" {entry} " in spaced]


@pytest.mark.parametrize("text, entries, expected", [
    ("a red circle.", ["circle", "red circle"], ["circle", "red circle"]),
    ("red circle,blue square", ["circle", "blue square"], ["circle", "blue square"]),
    ("Red Circle on white", ["red circle", "Red Circle", "red"], ["Red Circle"]),
    ("categories of cats", ["cat", "cats", "categories"], ["cats", "categories"]),
    ("a scatter plot", ["cat", "scatter", "plot"], ["scatter", "plot"]),
    ("red\tcircle\nnew line", ["red circle", "new line"], ["red circle", "new line"]),
    ("what?yes!`quoted`", ["what", "yes", "quoted"], ["what", "yes", "quoted"]),
    ("a dog; a cat: done", ["dog", "cat", "done"], ["dog", "cat", "done"]),
    ("red red red", ["red"], ["red"]),
    ("the new york times", ["new york", "york times", "new"], ["new york", "york times", "new"]),
    ("St. Louis arch", ["St. Louis", "Louis", "arch"], ["Louis", "arch"]),
    ("circle-shaped logo", ["circle", "logo"], ["logo"]),
    ("", ["a"], []),
])
def test_matching_follows_metaclip(text, entries, expected):
    matcher = EntryMatcher(entries)
    assert [entries[i] for i in matcher.match(text)] == expected
    assert matcher.match(text) == metaclip_plain_loop(text, entries)


def test_automaton_equals_plain_loop_on_random_texts():
    rng = random.Random(0)
    words = ["red", "circle", "Red", "blue", "square", "star", "stars", "a", "on", "white", "cat", "category"]
    entries = words + ["red circle", "blue square", "white star", "a red"]
    matcher = EntryMatcher(entries)
    for _ in range(500):
        text = "".join(rng.choice(words + [" ", " ", ",", ".", "!", "\n", "-"]) + rng.choice(["", " "])
                       for _ in range(rng.randint(0, 12)))
        assert matcher.match(text) == metaclip_plain_loop(text, entries), text


def test_batch_output_keeps_rows_and_order():
    batch = pd.DataFrame({"uid": ["u1", "u2", "u3"], "caption": ["a red circle", None, "blue"]})
    out = EntryMatcher(["red", "circle", "blue"])(batch)
    assert out["uid"].tolist() == ["u1", "u2", "u3"]
    assert out["matched_entries"].tolist() == [["red", "circle"], [], ["blue"]]


def test_read_metadata_formats(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(["red", "circle", "red", "Red circle"]))
    assert read_metadata(tmp_path / "m.json") == ["red", "circle", "Red circle"]
    (tmp_path / "m.txt").write_text("red\n\ncircle\nred circle\n")
    assert read_metadata(tmp_path / "m.txt") == ["red", "circle", "red circle"]
    (tmp_path / "bad.json").write_text(json.dumps({"red": 1}))
    with pytest.raises(InputError, match="bad.json: expected a JSON list of strings"):
        read_metadata(tmp_path / "bad.json")
    with pytest.raises(InputError, match="no such metadata file"):
        read_metadata(tmp_path / "absent.txt")


def test_default_metadata_is_shipped_and_covers_the_demo_concepts():
    entries = read_metadata(DEFAULT_METADATA)
    assert len(entries) > 20000
    for entry in ("red circle", "Red circle", "blue squares", "hexagon", "background", "crescent", "photo"):
        assert entry in entries
    for function_word in ("the", "a", "of", "on", "with"):
        assert function_word not in entries


def test_keep_probabilities_by_hand():
    matched = pd.Series([["head"], ["head", "tail"], ["tail"], [], ["head", "mid"], ["mid"]])
    # counts: head 3, tail 2, mid 2; t = 2: p_head = 2/3, p_tail = p_mid = 1
    probability, counts = keep_probabilities(matched, 2)
    assert counts.to_dict() == {"head": 3, "tail": 2, "mid": 2}
    np.testing.assert_allclose(probability, [2 / 3, 1, 1, 0, 1, 1])
    probability, _ = keep_probabilities(matched, 1)  # p_head = 1/3, p_tail = p_mid = 1/2
    np.testing.assert_allclose(probability, [1 / 3, 1 - (2 / 3) * (1 / 2), 1 / 2, 0, 1 - (2 / 3) * (1 / 2), 1 / 2])
    # counts over a larger pool (other shards): head 6, tail 2, mid 4; t = 2
    probability, counts = keep_probabilities(matched, 2, pd.Series({"head": 6, "tail": 2, "mid": 4}))
    np.testing.assert_allclose(probability, [1 / 3, 1, 1, 0, 1 - (2 / 3) * (1 / 2), 1 / 2])


def make_inputs(tmp_path, n_head=3000, n_tails=40, per_tail=6, n_unmatched=50, per_shard=1200, seed=0):
    """A manifest of successful downloads (``per_shard`` per shard): one head concept, many tail concepts, some
    texts with no entry; and the metadata file. Returns the uids and captions."""
    rng = np.random.default_rng(seed)
    captions = [f"a red circle {'on white' if rng.random() < 0.5 else 'drawing'}" for _ in range(n_head)]
    captions += [f"a tailshape{k} picture" for k in range(n_tails) for _ in range(per_tail)]
    captions += ["zzz qqq"] * n_unmatched
    uids = [f"{i:032x}" for i in range(len(captions))]
    pd.DataFrame({"uid": uids, "shard": [f"{i // per_shard:05d}.tar" for i in range(len(uids))],
                  "key": [f"{i:09d}" for i in range(len(uids))], "caption": captions, "original_width": 64,
                  "original_height": 64, "sha256": uids, "status": "success"}).to_parquet(tmp_path / "manifest.parquet")
    metadata = ["red circle"] + [f"tailshape{k}" for k in range(n_tails)]
    (tmp_path / "metadata.txt").write_text("\n".join(metadata) + "\n")
    return uids, captions


def run_balance(tmp_path, out: str, t: int, seed: int = 0) -> dict:
    """The curate stage with the balance step alone over make_inputs' manifest; returns the step's summary."""
    params = shrunk_params({"curate.steps": ["balance"], "balance.metadata": str(tmp_path / "metadata.txt"),
                            "balance.t": t, "project.seed": seed})
    [summary] = curate(tmp_path / "manifest.parquet", tmp_path / "shards", tmp_path / out, params)["steps"]
    return summary


def test_balancing_keeps_tail_and_subsamples_head(tmp_path):
    uids, captions = make_inputs(tmp_path)
    summary = run_balance(tmp_path, "out", t=100)
    table = read_step_table(tmp_path / "out", "balance")
    counts = pd.read_parquet(tmp_path / "out" / "steps" / "balance" / "entry_counts.parquet").set_index("entry")
    assert list(table.columns) == ["uid", "keep", "reason", "matched_entries", "keep_probability"]
    assert table["uid"].tolist() == uids
    assert summary["shards"] == 3  # the head's 3000 texts span every shard: counts are pool-wide

    tail = table["uid"].isin(uids[3000:3240])
    assert table.loc[tail, "keep"].all() and (table.loc[tail, "keep_probability"] == 1).all()
    unmatched = table["uid"].isin(uids[3240:])
    assert (table.loc[unmatched, "reason"] == "no_metadata_match").all()
    assert (table.loc[unmatched, "matched_entries"].map(len) == 0).all()
    head = table["uid"].isin(uids[:3000])
    np.testing.assert_allclose(table.loc[head, "keep_probability"], 100 / 3000)
    assert set(table.loc[head & ~table["keep"], "reason"]) == {"balance_subsampled"}
    assert (table["keep"] == (uid_uniform(table["uid"], 0) < table["keep_probability"])).all()

    assert counts.loc["red circle", "count_before"] == 3000
    assert counts.loc["tailshape7", "count_before"] == counts.loc["tailshape7", "count_after"] == 6
    expected = table["keep_probability"].sum()
    std = np.sqrt((table["keep_probability"] * (1 - table["keep_probability"])).sum())
    assert abs(table["keep"].sum() - expected) <= 4 * std
    assert abs(counts.loc["red circle", "count_after"] - 100) <= 4 * np.sqrt(3000 * (100 / 3000) * (1 - 100 / 3000))

    assert summary["input"] == len(uids)
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["input"]
    assert summary["dropped"]["no_metadata_match"] == 50
    assert summary["head_entries"] == 1
    assert summary["tail_share"] == pytest.approx(240 / 3240)
    assert summary["tail_share_after"] > 0.6
    assert summary["expected_kept"] == pytest.approx(expected)
    assert json.loads((tmp_path / "out" / "steps" / "balance" / "summary.json").read_text()) == summary


def test_per_shard_decisions_equal_one_pass_over_the_pool(tmp_path):
    """The step's phases over 3 shards decide as its apply over the whole pool at once."""
    make_inputs(tmp_path, n_head=500, n_tails=3, per_shard=200)
    run_balance(tmp_path, "out", t=50)
    step = BalanceStep(BalanceParams(metadata=str(tmp_path / "metadata.txt"), t=50), StepContext(shards_dir="."))
    pool = step.apply(pd.read_parquet(tmp_path / "manifest.parquet")[["uid", "caption"]])
    shards = pd.concat([table for _, table in read_step(tmp_path / "out", "balance")], ignore_index=True)
    shards["matched_entries"] = shards["matched_entries"].map(list)
    pd.testing.assert_frame_equal(shards, pool)


def test_balancing_is_seeded(tmp_path):
    make_inputs(tmp_path, n_head=500, n_tails=2)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_balance(tmp_path, name, t=50, seed=seed)
        runs[name] = read_step_table(tmp_path / name, "balance")["keep"]
    assert runs["a"].equals(runs["b"])
    assert not runs["a"].equals(runs["c"])
