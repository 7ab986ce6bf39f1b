"""The curation ablation: arms from the curate stage's decisions, seeded runs at equal samples seen, one
evaluation suite, paired class-bootstrap CIs, and an MLflow parent run with a child per arm and seed."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from clipmill.cli import main
from clipmill.components.ablate.ablation import ABLATE_OWNER, check_out_dir
from clipmill.components.ablate.arms import resolve_arms
from clipmill.components.ablate.stats import bootstrap_delta, comparisons, effects_table
from clipmill.components.ablate.variants import load_variant
from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.io import atomic_path
from tests.curation_fixtures import COLORS, SHAPES, draw
from tests.curation_tables import make_curation

STEPS = ["rules", "spam", "dedup", "score", "balance", "rewrite"]


def write_shape_suite(out, per_class: int = 2):
    """A versioned suite over the fixture crawl's classes ('red circle', ...), images drawn like the crawl's."""
    out.mkdir(parents=True)
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    rows = [{"uid": f"z{i}-{k}", "image": draw(name.split()[1], name.split()[0], mark=200 + k), "label": i,
             "class_name": name} for i, name in enumerate(classes) for k in range(per_class)]
    pd.DataFrame(rows).to_parquet(out / "zeroshot.parquet", index=False)
    (out / "zeroshot_classes.json").write_text(json.dumps({"classes": classes, "templates": ["a {}."], "attributes": {
        "colour": [c for c in COLORS for _ in SHAPES], "shape": [s for _ in COLORS for s in SHAPES]}}))
    pd.DataFrame([{"uid": f"r{i}", "image": draw(n.split()[1], n.split()[0], mark=100 + i), "captions": [f"a {n}"]}
                  for i, n in enumerate(classes)]).to_parquet(out / "retrieval.parquet", index=False)
    (out / "suite.json").write_text(json.dumps({"version": "shapes-1"}))
    return out


# --- arms, variants, statistics --------------------------------------------------------------------------------

def test_arms_cut_the_declared_funnel_and_name_their_baselines():
    arms = {a.name: a for a in resolve_arms(None, STEPS)}
    assert list(arms) == ["raw", *STEPS]
    assert arms["raw"].steps == () and arms["raw"].baseline is None
    assert arms["score"].steps == ("rules", "spam", "dedup", "score") and arms["score"].baseline == "dedup"
    leave = {a.name: a for a in resolve_arms(["raw", "rewrite", "-score", "-rewrite"], STEPS)}
    assert leave["-score"].steps == ("rules", "spam", "dedup", "balance", "rewrite") and leave["-score"].recurate
    assert leave["-score"].baseline == "rewrite" and leave["-score"].label == "all but score"
    assert not leave["-rewrite"].recurate  # leaving out the last step is a cut: nothing to curate again
    with pytest.raises(ConfigError, match="unknown arm 'scores'"):
        resolve_arms(["raw", "scores"], STEPS)


def test_overrides_and_tuned_values_are_applied_only_when_given_and_reported(tmp_path):
    from tests.conftest import REPO

    params, changed = load_variant(REPO / "params.yaml", ["ablate.seeds=5", "train.lr=0.01"], None)
    assert params.ablate.seeds == 5 and params.train.lr == 0.01
    assert changed == {"override.ablate.seeds": 5, "override.train.lr": 0.01}
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"config_key": "train", "overrides": {"lr": 0.002, "batch_size": 32}}))
    base, nothing = load_variant(REPO / "params.yaml", [], None)
    assert nothing == {} and base.train.lr != 0.002  # a best_params.json is never picked up on its own
    tuned, changed = load_variant(REPO / "params.yaml", [], str(best))
    assert tuned.train.lr == 0.002 and changed["tuned.lr"] == 0.002 and changed["tuned.source"] == str(best)
    with pytest.raises(ConfigError, match="ablate.sedes"):
        load_variant(REPO / "params.yaml", ["ablate.sedes=2"], None)
    with pytest.raises(ConfigError, match=r"-S .*not valid YAML .*key 'a' given twice"):
        load_variant(REPO / "params.yaml", ["train.wd={a: 1, a: 2}"], None)
    twice = tmp_path / "params.yaml"
    twice.write_text("train:\n  lr: 0.1\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line 3: not valid YAML: key 'train' given twice"):
        load_variant(twice, [], None)


def test_the_paired_bootstrap_ci_excludes_zero_only_for_a_real_difference():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, size=(3, 60))
    better = np.clip(base + 0.1 + rng.normal(0, 0.02, base.shape), 0, 1)
    delta, low, high = bootstrap_delta(better, base, 1000, 0.95, np.random.default_rng(1))
    assert 0.08 < delta < 0.11 and 0 < low < delta < high
    noise = base + rng.normal(0, 0.05, base.shape)
    _, low, high = bootstrap_delta(noise, base, 1000, 0.95, np.random.default_rng(1))
    assert low < 0 < high


def test_the_funnel_effect_compares_the_fullest_cut_with_raw_beside_the_marginal_effects():
    arms = resolve_arms(["raw", "score", "balance", "rewrite", "-balance"], STEPS)
    assert comparisons(arms) == [("score", "raw", "marginal"), ("balance", "score", "marginal"),
                                 ("rewrite", "balance", "marginal"), ("-balance", "rewrite", "marginal"),
                                 ("rewrite", "raw", "funnel")]
    assert comparisons(resolve_arms(["raw", "score"], STEPS)) == [("score", "raw", "marginal")]  # nothing new
    assert comparisons(resolve_arms(["score", "rewrite"], STEPS)) == [("rewrite", "score", "marginal")]  # no raw
    assert comparisons(resolve_arms(["rewrite", "raw", "score"], STEPS)) == [  # listed out of order
        ("raw", "rewrite", "marginal"), ("score", "raw", "marginal"), ("rewrite", "raw", "funnel")]

    rng = np.random.default_rng(0)
    classes = [f"c{i:02d}" for i in range(30)]
    base = rng.uniform(0.2, 0.6, size=(2, len(classes)))
    steps = {"raw": base, "score": base + 0.04, "balance": base + 0.08, "rewrite": base + 0.12}
    per_class = pd.DataFrame([{"arm": arm, "seed": s, "class_name": c, "recall": recall[s, i]}
                              for arm, recall in steps.items() for s in range(2) for i, c in enumerate(classes)])
    effects = effects_table(per_class, resolve_arms(list(steps), STEPS), 500, 0.95, 0)
    overall = effects[effects["metric"] == "zeroshot/mean_per_class_recall"].set_index(["arm", "baseline"])
    assert overall.loc[("balance", "score"), "effect"] == "marginal"
    assert overall.loc[("balance", "score"), "delta"] == pytest.approx(0.04)
    funnel = overall.loc[("rewrite", "raw")]
    assert funnel["effect"] == "funnel" and funnel["delta"] == pytest.approx(0.12) and funnel["excludes_zero"]


# --- end to end ------------------------------------------------------------------------------------------------

def test_ablate_trains_each_arm_and_seed_and_writes_the_table_cis_and_child_runs(tmp_path, mlflow_uri, monkeypatch):
    curation = make_curation(tmp_path / "crawl", n=160, per_shard=80, steps=["rules", "spam", "dedup"])
    suite = write_shape_suite(tmp_path / "eval")
    params_file = tmp_path / "params.yaml"
    # the fixture curation's own choices: the arms are cut from the curation under these params (curated again)
    params_file.write_text("tracking: {experiment: ablation-test}\ncurate: {steps: [rules, spam, dedup]}\n"
                           f"filter: {{min_image_side: {curation['params'].filter.min_image_side}}}\n")
    monkeypatch.chdir(tmp_path)
    p = curation["paths"]
    overrides = ["ablate.arms=[raw, rules]", "ablate.seeds=2", "ablate.samples_per_epoch=64", "ablate.bootstrap=200",
                 "ablate.work_dir=work", "train.batch_size=16", "train.epochs=1", "train.num_workers=0",
                 "train.cpu_threads=1", "train.warmup_steps=1", "train.seed=7",
                 f"evaluate.concept_counts={p['curate']}"]
    argv = ["ablate", "--params", str(params_file), "--curate", str(p["curate"]), "--shards", str(p["shards"]),
            "--manifest", str(p["manifest"]), "--bootstrap-model", str(p["scorer"]), "--eval-dir", str(suite),
            "--out", str(tmp_path / "report")]
    for o in overrides:
        argv += ["-S", o]
    assert main(argv) == 0

    report = tmp_path / "report"
    arms = pd.read_csv(report / "arms.csv").set_index("arm")
    assert arms.loc["raw", "samples"] > arms.loc["rules", "samples"] > 0  # the rules drop some downloads
    assert arms.loc["raw", "uid_hash"] != arms.loc["rules", "uid_hash"]
    curated = {a: set(pd.read_parquet(tmp_path / "work" / a / "curated" / "manifest.parquet")["uid"])
               for a in ("raw", "rules")}
    rules = curation["tables"]["rules"]
    assert curated["rules"] == set(rules.loc[rules["keep"], "uid"]) and curated["rules"] < curated["raw"]

    runs = pd.read_csv(report / "runs.csv")
    assert sorted(zip(runs["arm"], runs["seed"])) == [("raw", 7), ("raw", 8), ("rules", 7), ("rules", 8)]
    assert set(runs["samples_seen"]) == {64}  # equal samples seen in every run
    means = pd.read_csv(report / "means.csv")
    assert means["arm"].tolist() == ["raw", "rules"] and {"zeroshot/acc1", "zeroshot/recall_tail"} <= set(means)
    assert {"zeroshot/acc1_colour", "zeroshot/acc1_shape"} <= set(means)  # the suite's attributes follow
    effects = pd.read_csv(report / "effects.csv")
    assert set(effects["metric"]) == {"zeroshot/mean_per_class_recall", "zeroshot/recall_head",
                                      "zeroshot/recall_mid", "zeroshot/recall_tail"}
    assert (effects["arm"] == "rules").all() and (effects["ci_low"] <= effects["delta"]).all() \
        and (effects["delta"] <= effects["ci_high"]).all()
    table = (report / "table.md").read_text()
    assert "| raw download |" in table and "| + rules |" in table and "CI" in table and "acc1_shape" in table
    assert (report / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    mlflow.set_tracking_uri(mlflow_uri)
    found = mlflow.search_runs(experiment_names=["ablation-test"], output_format="list")
    (parent,) = [r for r in found if r.data.tags.get("clipmill.stage") == "ablate"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["clipmill.ablation.arm"], r.data.tags["clipmill.ablation.seed"]) for r in children) \
        == [("raw", "7"), ("raw", "8"), ("rules", "7"), ("rules", "8")]
    assert all("zeroshot/acc1" in r.data.metrics and r.data.params["seed"] in ("7", "8") for r in children)
    assert parent.data.params["override.ablate.seeds"] == "2" and parent.info.status == "FINISHED"
    assert "ablation/table.md" in {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "ablation")}

    # run again into the same --out (a variant): its results replace the first run's
    again = [a if a != "ablate.arms=[raw, rules]" else "ablate.arms=[raw]" for a in argv]
    assert main([a if a != "ablate.seeds=2" else "ablate.seeds=1" for a in again]) == 0
    assert list(zip(*pd.read_csv(report / "runs.csv")[["arm", "seed"]].to_numpy().T)) == [("raw", 7)]


def test_an_out_dir_the_results_could_not_replace_is_refused_before_any_training(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to replace this file"):
        check_out_dir(str(tmp_path / "notes.txt"))
    foreign = tmp_path / "reports"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a clipmill stage output"):
        check_out_dir(str(foreign))
    earlier = tmp_path / "ablation"  # an ablation's results from before outputs were marked
    earlier.mkdir()
    for name in ("table.md", "runs.csv", "ablation.png"):
        (earlier / name).write_text("x")
    check_out_dir(str(earlier))
    with atomic_path(earlier, owner=ABLATE_OWNER) as tmp:
        tmp.mkdir()
        (tmp / "table.md").write_text("new")
    assert (earlier / "table.md").read_text() == "new" and not (earlier / "runs.csv").exists()
    assert (tmp_path / "notes.txt").read_text() == (foreign / "notes.txt").read_text() == "mine"


def test_an_all_but_arm_curates_again_without_touching_the_curate_stage_outputs(tmp_path):
    from clipmill.components.ablate.ablation import Inputs
    from clipmill.components.common.curation import read_step_table
    from clipmill.pipelines.ablate import build_arm

    curation = make_curation(tmp_path / "crawl", n=120, per_shard=60, steps=["rules", "spam", "dedup"])
    p, params = curation["paths"], curation["params"]
    before = {f: f.read_bytes() for f in p["curate"].rglob("*") if f.is_file()}
    (arm,) = resolve_arms(["-rules"], params.curate.steps)
    info = build_arm(arm, params, Inputs(p["curate"], p["shards"], tmp_path, p["manifest"]), tmp_path / "arm")

    kept = set(pd.read_parquet(tmp_path / "arm" / "curated" / "manifest.parquet")["uid"])
    dedup = read_step_table(tmp_path / "arm" / "curate", "dedup")
    assert kept == set(dedup.loc[dedup["keep"], "uid"]) and info["samples"] == len(kept)
    rules = curation["tables"]["rules"]
    assert kept & set(rules.loc[~rules["keep"], "uid"])  # what the rules dropped reaches the later steps
    assert {f: f.read_bytes() for f in p["curate"].rglob("*") if f.is_file()} == before


def test_an_arm_that_keeps_no_samples_is_one_clear_error_before_training(tmp_path):
    from clipmill.components.ablate.ablation import Inputs
    from clipmill.pipelines.ablate import build_arm

    curation = make_curation(tmp_path / "crawl", n=60, per_shard=30, steps=["rules", "spam", "dedup"])
    p, params = curation["paths"], curation["params"].model_copy(deep=True)
    params.filter.min_image_side = 10_000  # the arm is curated again with these params: the rules drop everything
    (arm,) = resolve_arms(["-spam"], params.curate.steps)
    with pytest.raises(ConfigError, match="arm '-spam' .all but spam. keeps no samples"):
        build_arm(arm, params, Inputs(p["curate"], p["shards"], tmp_path, p["manifest"]), tmp_path / "arm")


def test_an_override_of_a_steps_params_changes_the_arms_cut_after_it(tmp_path):
    """-S filter.min_words=... must reach the rules' decisions (the arms are cut from the curation under the
    ablation's params), and with the stage's own params nothing differs from the stage's decisions."""
    from clipmill.components.ablate.ablation import Inputs
    from clipmill.components.common.curation import read_step_table
    from clipmill.pipelines.ablate import build_arm, variant_curation

    curation = make_curation(tmp_path / "crawl", n=120, per_shard=60, steps=["rules", "spam", "dedup"])
    p, params = curation["paths"], curation["params"]
    before = {f: f.read_bytes() for f in p["curate"].rglob("*") if f.is_file()}
    inputs = Inputs(p["curate"], p["shards"], tmp_path, p["manifest"])
    (arm,) = resolve_arms(["rules"], params.curate.steps)

    same = variant_curation(params, inputs, tmp_path / "same" / "curate")
    kept_same = build_arm(arm, params, same, tmp_path / "same" / "rules")["samples"]
    rules = curation["tables"]["rules"]
    assert kept_same == int(rules["keep"].sum())
    assert read_step_table(same.curate, "dedup").equals(read_step_table(p["curate"], "dedup"))

    stricter = params.model_copy(deep=True)
    stricter.filter.boilerplate_patterns = [*params.filter.boilerplate_patterns, r"^a red [a-z]+ on .*$"]
    variant = variant_curation(stricter, inputs, tmp_path / "variant" / "curate")
    kept_variant = build_arm(arm, stricter, variant, tmp_path / "variant" / "rules")["samples"]
    redone = read_step_table(variant.curate, "rules")
    assert kept_variant == int(redone["keep"].sum()) < kept_same
    assert set(redone.loc[redone["reason"] == "boilerplate", "uid"]) \
        > set(rules.loc[rules["reason"] == "boilerplate", "uid"])
    assert {f: f.read_bytes() for f in p["curate"].rglob("*") if f.is_file()} == before


def test_an_ablation_without_a_finished_curation_is_one_clear_error(tmp_path):
    from clipmill.components.ablate.ablation import Inputs
    from clipmill.components.common.errors import InputError
    from clipmill.pipelines.ablate import variant_curation

    with pytest.raises(InputError, match="not a finished curation .*run the curate stage first"):
        variant_curation(None, Inputs(tmp_path / "missing", tmp_path, tmp_path, tmp_path / "m.parquet"),
                         tmp_path / "work" / "curate")
