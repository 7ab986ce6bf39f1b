"""Caption rewriting: the rules backend, the faithfulness guard, the stage's table, counts and errors."""
from __future__ import annotations

import json

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmill.cli import main as clipmill_main
from components.common.errors import InputError
from components.common.hashing import make_uid
from components.common.params import RayParams, TrackingParams
from components.common.text import missing_entries, spaced_text
from components.rewrite.backends import Generated
from components.rewrite.captions import rewrite_captions
from components.rewrite.guard import guard_rewrites
from components.rewrite.params import RewriteParams
from components.rewrite.prompt import build_prompt
from components.rewrite.rules import RulesBackend

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


def write_inputs(tmp_path, table: pd.DataFrame, dropped: int = 5) -> tuple:
    """balance.parquet (the first ``dropped`` rows subsampled away) and a manifest with the captions."""
    keep = [i >= dropped for i in range(len(table))]
    balance = pd.DataFrame({"uid": table["uid"], "matched_entries": table["matched_entries"], "keep": keep,
                            "reason": [None if k else "balance_subsampled" for k in keep]})
    manifest = pd.DataFrame({"uid": table["uid"], "caption": table["caption"], "status": "success"})
    balance.to_parquet(tmp_path / "balance.parquet", index=False)
    manifest.to_parquet(tmp_path / "manifest.parquet", index=False)
    return tmp_path / "balance.parquet", tmp_path / "manifest.parquet"


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
    assert guard_rewrites(caption, entries, Generated(error="backend:timeout"), slots=3) == ([], ["backend:timeout"] * 3)


def test_prompt_has_three_examples_chosen_per_caption():
    params = RewriteParams()
    prompts = [build_prompt(f"uid{i}", "a red circle", params.instruction, params.examples, 3, seed=0) for i in range(20)]
    assert all(len(p.examples) == 3 and len(set(p.examples)) == 3 for p in prompts)
    assert len({p.examples for p in prompts}) > 1
    assert prompts[0] == build_prompt("uid0", "a red circle", params.instruction, params.examples, 3, seed=0)
    messages = prompts[0].messages()
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"] == "a red circle"
    assert prompts[0].text().endswith("\na red circle =>")


def test_stage_writes_one_row_per_kept_caption_and_counts_add_up(tmp_path, mlflow_uri):
    table = captions(120)
    balance_path, manifest_path = write_inputs(tmp_path, table, dropped=5)
    out, summary_path = tmp_path / "curate" / "rewrites.parquet", tmp_path / "curate" / "rewrites_summary.json"
    params = RewriteParams(batch_size=32)
    summary = rewrite_captions(balance_path, manifest_path, out, summary_path, params, 0, RayParams(),
                               TrackingParams(tracking_uri=mlflow_uri))
    schema = pq.read_schema(out)
    assert schema.names == ["uid", "rewrites", "backend", "model"]
    assert pa.types.is_list(schema.field("rewrites").type) and schema.field("rewrites").type.value_type == pa.string()
    rewrites = pd.read_parquet(out)
    assert sorted(rewrites["uid"]) == sorted(table["uid"][5:])
    assert set(rewrites["backend"]) == {"rules"} and set(rewrites["model"]) == {"rules"}
    assert summary == json.loads(summary_path.read_text())
    assert summary["captions"] == 115 and summary["slots"] == 115 * 4
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["slots"]
    assert summary["kept"] == rewrites["rewrites"].map(len).sum()
    by_uid = table.set_index("uid")
    for uid, texts in zip(rewrites["uid"], rewrites["rewrites"]):
        assert all(isinstance(t, str) and t.strip() for t in texts)
        assert all(not missing_entries(by_uid.at[uid, "matched_entries"], t) for t in texts)
    runs = mlflow.search_runs(experiment_names=["clipmill"])
    assert len(runs) == 1 and runs["metrics.kept"].iloc[0] == summary["kept"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs["run_id"].iloc[0])}
    assert {"rewrites_summary.json", "rewrite_examples.json"} <= artifacts


def test_missing_column_is_one_clear_error(tmp_path):
    table = captions(10)
    balance_path, manifest_path = write_inputs(tmp_path, table)
    pd.read_parquet(balance_path).drop(columns="matched_entries").to_parquet(balance_path, index=False)
    with pytest.raises(InputError, match="field 'matched_entries': missing column"):
        rewrite_captions(balance_path, manifest_path, tmp_path / "r.parquet", tmp_path / "s.json", RewriteParams(), 0,
                         RayParams(), TrackingParams(enabled=False))
    assert not (tmp_path / "r.parquet").exists()


def test_cli_reports_kept_uid_missing_from_manifest(tmp_path, capsys, monkeypatch):
    table = captions(10)
    balance_path, manifest_path = write_inputs(tmp_path, table, dropped=0)
    pd.read_parquet(manifest_path).iloc[1:].to_parquet(manifest_path, index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("tracking:\n  enabled: false\n")
    out = tmp_path / "rewrites.parquet"
    rc = clipmill_main(["stage", "rewrite", "--params", str(params_file), "--balance", str(balance_path),
                        "--manifest", str(manifest_path), "--out", str(out), "--summary", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "manifest.parquet: field 'uid': 1 uids kept by balancing have no row" in err[0]
    assert not out.exists()


def test_ray_engine_writes_the_same_table_as_local(tmp_path):
    table = captions(60)
    balance_path, manifest_path = write_inputs(tmp_path, table, dropped=0)
    outputs = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.parquet"
        # batch_size 16: several batches, spread over Ray actors.
        rewrite_captions(balance_path, manifest_path, out, tmp_path / f"{engine}.json",
                         RewriteParams(engine=engine, batch_size=16), 0, RayParams(num_cpus=1),
                         TrackingParams(enabled=False))
        outputs[engine] = pd.read_parquet(out)
    pd.testing.assert_frame_equal(outputs["local"], outputs["ray"])
    assert json.loads((tmp_path / "local.json").read_text()) == json.loads((tmp_path / "ray.json").read_text())
