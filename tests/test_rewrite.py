"""Caption rewriting: the rules backend, the faithfulness guard, prompts, the step's table, counts and errors."""
from __future__ import annotations

import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmill.components.common.curation import output_path, read_step_table
from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.hashing import make_uid
from clipmill.components.common.steps import StepContext
from clipmill.components.common.text import missing_entries, spaced_text
from clipmill.components.curate.stage import curate
from clipmill.components.rewrite.generated import Generated
from clipmill.components.rewrite.guard import guard_rewrites
from clipmill.components.rewrite.params import OpenAIBackendParams, RewriteParams
from clipmill.components.rewrite.prompt import build_prompt
from clipmill.components.rewrite.rules import RulesBackend
from clipmill.components.rewrite.step import RewriteStep
from tests.test_curate import shrunk_params

COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star", "heart"]
FRAMES = ["{d}", "a photo of {d}", "{d} on a plain background", "cute {d} clipart", "{d} in the center",
          "an image of {d} and a {c2} {s2}", "simple {d}, vector illustration"]
ENTRIES = COLORS + SHAPES + [f"{c} {s}" for c in COLORS for s in SHAPES] + ["photo", "image", "background"]


def captions(n: int) -> pd.DataFrame:
    """(uid, caption, matched_entries) rows in the demo crawl's style, entries matched by the MetaCLIP rule."""
    rows = []
    for i in range(n):
        c, s = COLORS[i % 5], SHAPES[(i // 5) % 5]
        c2, s2 = COLORS[(i + 2) % 5], SHAPES[(i + 3) % 5]
        caption = FRAMES[i % len(FRAMES)].format(d=f"a {c} {s}", c2=c2, s2=s2)
        spaced = spaced_text(caption)
        rows.append({"uid": make_uid(f"http://x/{i}", caption), "caption": caption,
                     "matched_entries": [e for e in ENTRIES if f" {e} " in spaced]})
    return pd.DataFrame(rows)


def test_rules_backend_is_deterministic_and_keeps_the_matched_entries():
    table = captions(300)
    params = RewriteParams()
    args = (table["uid"].tolist(), table["caption"].tolist(), table["matched_entries"].tolist())
    first = RulesBackend(params, seed=7).generate(*args)
    assert [g.candidates for g in first] == [g.candidates for g in RulesBackend(params, seed=7).generate(*args)]
    assert [g.candidates for g in first] != [g.candidates for g in RulesBackend(params, seed=8).generate(*args)]
    kept_total = 0
    for caption, entries, generated in zip(table["caption"], table["matched_entries"], first):
        assert len(generated.candidates) == params.rewrites_per_caption
        # Rules never touch the words of a matched entry, so the guard never finds one lost.
        assert all(not missing_entries(entries, c) for c in generated.candidates), (caption, generated)
        kept, dropped = guard_rewrites(caption, entries, generated, params.rewrites_per_caption)
        assert "lost_entry" not in dropped
        kept_total += len(kept)
    assert kept_total >= 0.8 * len(table) * params.rewrites_per_caption


def test_rules_backend_varies_wording_order_and_frame():
    params = RewriteParams(rewrites_per_caption=8)
    caption = "a photo of a big red circle and a small blue square in the middle"
    entries = ["red", "red circle", "circle", "blue", "square", "photo"]
    rewrites = RulesBackend(params, seed=0).generate(["u1"], [caption], [entries])[0].candidates
    joined = " | ".join(rewrites)
    assert any(r.index("blue square") < r.index("red circle") for r in rewrites), joined  # items reordered
    assert any(w in joined for w in ("large", "huge", "little", "tiny", "center")), joined  # synonyms
    assert len(set(rewrites)) >= 6, joined
    assert all("photo" in r for r in rewrites)  # a matched entry is never swapped for a synonym


def test_listed_items_move_and_the_rest_stays_in_place():
    params = RewriteParams(rewrites_per_caption=12)
    caption = "a green cross, a yellow triangle and a scarlet rhombus, vector illustration"
    rewrites = RulesBackend(params, seed=3).generate(["u1"], [caption], [["green cross", "scarlet"]])[0].candidates
    reordered = [r for r in rewrites if not r.replace("a picture of ", "").startswith("a green cross")]
    assert reordered, rewrites
    for r in rewrites:
        assert ", vector illustration" in r or ", vector artwork" in r or ", vector drawing" in r, r
        assert sorted(x for x in ("a green cross", "a yellow triangle", "a scarlet rhombus") if x in r) == [
            "a green cross", "a scarlet rhombus", "a yellow triangle"], r


def test_guard_drops_each_bad_rewrite_with_its_reason():
    caption = "a red circle on a plain background"
    entries = ["red circle", "background"]
    candidates = ["A red circle, shown on a plain background.", "", "a red circle on a plain background.",
                  "a RED circle on a plain backdrop", "a red circle shown on a plain background",
                  "a picture of a red circle against a background"]
    kept, dropped = guard_rewrites(caption, entries, Generated(candidates), slots=8)
    assert kept == ["A red circle, shown on a plain background.", "a picture of a red circle against a background"]
    assert dropped == ["empty", "same_as_caption", "lost_entry", "duplicate", "not_generated", "not_generated"]
    assert len(kept) + len(dropped) == 8
    assert guard_rewrites(caption, entries, Generated(error="backend:timeout"),
                          slots=3) == ([], ["backend:timeout"] * 3)


@pytest.mark.parametrize("caption, rewrite, reason", [
    ("a photo of an orange diamond and two blue diamonds", "two blue diamonds and a photo of an orange diamond",
     "frame_moved"),
    ("a photo of a red moon", "a photo of a photo of a red moon", "frame_repeated"),
    ("picture of a lime cross", "a photo of picture of a lime cross", "frame_repeated"),
    ("two blue diamonds and an orange diamond", "three blue diamonds and an orange diamond", "count_changed"),
    ("two blue diamonds and an orange diamond", "blue diamonds and an orange diamond", "count_changed"),
    ("two blue diamonds and an orange diamond", "two blue diamonds and a yellow diamond", "colour_changed"),
    ("a red circle", "a red circle - visit http://spam.example.com", "added_url"),
    ("a red circle", "a red circle, buy cheap replica watches with free worldwide shipping", "added_text"),
    ("a red circle on a grey background", "a red circle on a grey background, a red circle on a grey background",
     "repeated_text"),
    ("a red circle", "a red circle a red circle a red circle", "repeated_text"),
])
def test_guard_rejects_corrupting_rewrites(caption, rewrite, reason):
    assert guard_rewrites(caption, [], Generated([rewrite]), slots=1) == ([], [reason])


def test_guard_keeps_faithful_reframed_and_reordered_rewrites():
    caption = "a photo of an orange diamond and two blue diamonds"
    good = ["two blue diamonds and an orange diamond, as seen in a photo", "an image showing two blue diamonds and "
            "an orange diamond", "At the center, an orange diamond is shown next to two blue diamonds."]
    # a run the caption itself repeats may be repeated as often
    kept, dropped = guard_rewrites("a red dot, a red dot and a red dot", [],
                                   Generated(["an image of a red dot, a red dot and a red dot"]), slots=1)
    assert dropped == []
    kept, dropped = guard_rewrites(caption, ["orange", "diamond"], Generated(good), slots=3)
    assert kept == good and dropped == []


def test_guard_reads_numbers_as_numbers_not_as_file_name_digits():
    kept, dropped = guard_rewrites("2 golden hearts IMG_0042.jpg", [],
                                   Generated(["two golden hearts", "3 golden hearts"]), slots=2)
    assert kept == ["two golden hearts"] and dropped == ["count_changed"]


@pytest.mark.parametrize("caption, entries", [
    ("a photo of an orange diamond and two blue diamonds", ["photo", "orange", "blue"]),
    ("a photo of a red moon to the left of a yellow love heart - image via Pinterest", ["photo", "image", "red"]),
    ("picture of a lime cross and a green heart", ["picture", "lime", "cross"]),
    ("a poster showing a green cross, a green heart and a yellow square", ["green cross", "poster"]),
    ("close-up of a white star and a small green heart", ["close-up", "star"]),
])
def test_rules_rewrites_never_move_or_double_a_frame(caption, entries):
    params = RewriteParams(rewrites_per_caption=12)
    rewrites = RulesBackend(params, seed=5).generate(["u1"], [caption], [entries])[0].candidates
    for rewrite in rewrites:
        assert not re.search(r"\band (a|an|the) (photo|picture|image|poster)", rewrite), rewrite
        frames = re.findall(r"\b(photo|picture|image|view|poster|close-up)s? (of|showing|shows)\b"
                            r"|\bin an? (photo|picture)\b", rewrite)
        assert len(frames) <= 1, rewrite
    kept, dropped = guard_rewrites(caption, entries, Generated(rewrites), slots=12)
    assert not {"frame_moved", "frame_repeated", "count_changed", "colour_changed", "lost_entry"} & set(dropped)
    assert kept


def test_prompt_has_three_examples_chosen_per_caption():
    params = RewriteParams()
    prompts = [build_prompt(f"uid{i}", "a red circle", params.instruction, params.examples, 3, seed=0)
               for i in range(20)]
    assert all(len(p.examples) == 3 and len(set(p.examples)) == 3 for p in prompts)
    assert len({p.examples for p in prompts}) > 1
    assert prompts[0] == build_prompt("uid0", "a red circle", params.instruction, params.examples, 3, seed=0)
    messages = prompts[0].messages()
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"] == "<caption>a red circle</caption>"  # delimited: the caption is data
    assert prompts[0].text().endswith("\na red circle =>")


def write_inputs(tmp_path, table: pd.DataFrame, unmatched: int = 5, per_shard: int = 50) -> None:
    """A manifest of successful downloads (``per_shard`` per shard) with the captions, the first ``unmatched`` of
    them replaced by captions that match no metadata entry; and the metadata file (ENTRIES)."""
    captions = [f"zzz qqq number {i}" if i < unmatched else c for i, c in enumerate(table["caption"])]
    n = len(table)
    pd.DataFrame({"uid": table["uid"], "shard": [f"{i // per_shard:05d}.tar" for i in range(n)],
                  "key": [f"{i:09d}" for i in range(n)], "caption": captions, "original_width": 64,
                  "original_height": 64, "sha256": table["uid"], "status": "success"}).to_parquet(
        tmp_path / "manifest.parquet", index=False)
    (tmp_path / "metadata.txt").write_text("\n".join(ENTRIES) + "\n")


def test_the_step_writes_one_row_per_kept_caption_and_counts_add_up(tmp_path):
    table = captions(120)
    write_inputs(tmp_path, table, unmatched=5)
    params = shrunk_params({"curate.steps": ["balance", "rewrite"], "balance.metadata": str(tmp_path / "metadata.txt"),
                            "balance.t": 1000, "rewrite.batch_size": 32})
    summary = curate(tmp_path / "manifest.parquet", tmp_path / "shards", tmp_path / "curate", params)
    balance, rewrites = read_step_table(tmp_path / "curate", "balance"), read_step_table(tmp_path / "curate", "rewrite")
    assert balance["keep"].sum() == 115 and set(balance.loc[~balance["keep"], "reason"]) == {"no_metadata_match"}

    schema = pq.read_schema(output_path(tmp_path / "curate", "rewrite", "00000"))
    assert schema.names == ["uid", "keep", "reason", "rewrites", "rewrite_dropped"]
    for column in ("rewrites", "rewrite_dropped"):
        assert pa.types.is_list(schema.field(column).type) and schema.field(column).type.value_type == pa.string()
    assert rewrites["uid"].tolist() == balance.loc[balance["keep"], "uid"].tolist()
    assert rewrites["keep"].all() and rewrites["reason"].isna().all()

    step = summary["steps"][-1]
    assert step["input"] == step["kept"] == 115 and step["shards"] == 3
    counts = step["rewrites"]
    assert (counts["backend"], counts["model"]) == ("rules", "rules")
    assert counts["captions"] == 115 and counts["slots"] == 115 * 4
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["slots"]
    assert counts["kept"] == rewrites["rewrites"].map(len).sum()
    assert sum(map(len, rewrites["rewrite_dropped"])) == sum(counts["dropped"].values())
    entries = balance.set_index("uid")["matched_entries"]
    for uid, texts in zip(rewrites["uid"], rewrites["rewrites"]):
        assert all(isinstance(t, str) and t.strip() for t in texts)
        assert all(not missing_entries(list(entries[uid]), t) for t in texts)


class HalfFailing:
    """A backend whose every other caption gets no answer."""

    def __init__(self, params, seed):
        pass

    def generate(self, uids, captions, entries):
        return [Generated(error="backend:http_500") if i % 2 else Generated([f"{c}, rewritten"])
                for i, c in enumerate(captions)]


def test_a_shard_with_too_many_failed_captions_raises(monkeypatch):
    monkeypatch.setattr("clipmill.components.rewrite.captions.make_backend", HalfFailing)
    batch = captions(10)
    lenient = RewriteParams(rewrites_per_caption=2, openai=OpenAIBackendParams(max_failed_fraction=0.5))
    out = RewriteStep(lenient, StepContext(shards_dir=".")).apply(batch)
    assert out["keep"].all() and out["rewrites"].map(len).tolist() == [1, 0] * 5
    assert out["rewrite_dropped"].map(list).tolist() == [["not_generated"], ["backend:http_500"] * 2] * 5

    strict = RewriteParams(rewrites_per_caption=2, openai=OpenAIBackendParams(max_failed_fraction=0.4))
    with pytest.raises(ClipmillError, match="5 of 10 captions of a shard got no answer"):
        RewriteStep(strict, StepContext(shards_dir=".")).apply(batch)


def test_an_empty_shard_gets_an_empty_table():
    batch = captions(3).iloc[0:0]
    out = RewriteStep(RewriteParams(), StepContext(shards_dir=".")).apply(batch)
    assert out.empty and list(out.columns) == ["uid", "keep", "reason", "rewrites", "rewrite_dropped"]
