"""Rule filter steps: rule reasons and precedence, switches, boilerplate patterns, pool-wide dedup, bad input."""
from __future__ import annotations

import re
import signal

import numpy as np
import pandas as pd
import pytest

from clipmill.components.common.curation import read_step_table
from clipmill.components.common.errors import InputError
from clipmill.components.common.steps import StepContext
from clipmill.components.filter.params import FilterParams
from clipmill.components.filter.rules import rule_reasons
from clipmill.components.filter.step import DedupStep, RulesStep
from tests.curation_fixtures import make_download
from tests.test_curate import run_curate, shrunk_params

FILTER_STEPS = {"curate.steps": ["rules", "dedup"], "filter.min_image_side": 32, "filter.max_aspect_ratio": 3.0}
CONTEXT = StepContext(shards_dir=".")


def expected_reason(i: int) -> str | None:
    """The rule the fixture's successful sample i fails first, by the fixture's injection rules and the check order."""
    if i % 19 == 5:
        return "min_words"
    if i % 17 == 3:
        return "min_words"  # "IMG_1003.jpg" is one word: the word rule comes before boilerplate
    if i % 23 == 9:
        return "min_image_side"
    if i % 29 == 11:
        return "max_aspect_ratio"
    return None


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    # 30 per shard: sample 30 copies sample 28's image across a shard boundary.
    return make_download(tmp_path_factory.mktemp("download"), n=120, per_shard=30)


def test_reasons_and_counts_add_up(download, tmp_path):
    summary = run_curate(download, tmp_path, shrunk_params(FILTER_STEPS))
    rules, dedup = read_step_table(tmp_path, "rules"), read_step_table(tmp_path, "dedup")
    manifest = download["table"]
    successes = manifest[manifest["status"] == "success"]
    assert list(rules.columns) == ["uid", "keep", "reason"]
    assert rules["uid"].tolist() == successes["uid"].tolist()  # failed downloads never reach a step
    assert (rules["keep"] == rules["reason"].isna()).all()
    assert rules["reason"].tolist() == [expected_reason(i) for i in successes.index]

    assert dedup["uid"].tolist() == rules.loc[rules["keep"], "uid"].tolist()
    duplicates = dedup[~dedup["keep"]]
    assert set(duplicates["reason"]) == {"duplicate_image"}
    assert len(duplicates) == 3  # i = 30, 61, 92 each repeat an image the rules kept
    for uid in duplicates["uid"]:
        sha = manifest.loc[manifest["uid"] == uid, "sha256"].item()
        twins = manifest[manifest["sha256"] == sha]
        assert dedup.loc[dedup["uid"].isin(twins["uid"]) & dedup["keep"], "uid"].tolist() == [min(twins["uid"])]
    sample_30 = manifest.loc[30, "uid"], manifest.loc[28, "uid"]
    assert dedup["uid"].isin(sample_30).sum() == 2 and dedup.loc[dedup["uid"].isin(sample_30), "keep"].sum() == 1

    rules_summary, dedup_summary = summary["steps"]
    assert rules_summary["input"] == 112 and rules_summary["shards"] == 4
    assert rules_summary["kept"] + sum(rules_summary["dropped"].values()) == 112
    assert dedup_summary["input"] == rules_summary["kept"]
    assert dedup_summary["dropped"] == {"duplicate_image": 3}
    assert summary["kept"] == dedup_summary["kept"] == dedup["keep"].sum()


def test_each_rule_can_be_switched_off(download, tmp_path):
    off = {**FILTER_STEPS, "filter.min_words": None, "filter.min_chars": None, "filter.min_image_side": None,
           "filter.max_aspect_ratio": None, "filter.boilerplate_patterns": [], "filter.dedup_images": False}
    summary = run_curate(download, tmp_path, shrunk_params(off))
    assert [(s["input"], s["kept"], s["dropped"]) for s in summary["steps"]] == [(112, 112, {}), (112, 112, {})]


def test_rule_precedence_and_boilerplate_defaults():
    batch = pd.DataFrame({
        "uid": list("abcdefgh"),
        "caption": ["a red circle on white", "IMG_0042 a red circle", "Click to enlarge this photo",
                    "photo.JPG", "red circle", "a blue square shape", "  a wide   banner  ", None],
        "original_width": [300, 300, 300, 300, 300, 100, 1000, 300],
        "original_height": [300, 300, 300, 300, 300, 300, 200, 300],
    })
    reasons = rule_reasons(batch, FilterParams(min_words=3, min_chars=6, min_image_side=200))
    assert dict(zip(batch["uid"], reasons)) == {
        "a": None, "b": None, "c": "boilerplate", "d": "min_words",
        "e": "min_words", "f": "min_image_side", "g": "max_aspect_ratio", "h": "min_words",
    }
    one_word = rule_reasons(batch, FilterParams(min_words=1, min_chars=1))
    assert one_word[3] == "boilerplate"  # a bare file name
    no_patterns = rule_reasons(batch, FilterParams(boilerplate_patterns=[], min_words=1))
    assert no_patterns[2] is None and no_patterns[3] is None

    decided = RulesStep(FilterParams(min_words=3, min_chars=6, min_image_side=200), CONTEXT).apply(batch)
    assert list(decided.columns) == ["uid", "keep", "reason"]
    assert decided["reason"].tolist() == list(reasons) and decided["keep"].tolist() == [r is None for r in reasons]


@pytest.mark.parametrize("caption", ["untitled-1.png", "DSC00042.JPG", "Screenshot_000042.png", "download (3).jpg",
                                     "click image to view full size", "Picture 1", "HD wallpaper", "no image"])
def test_default_patterns_catch_boilerplate_only_captions(caption):
    assert any(re.search(p, caption) for p in FilterParams().boilerplate_patterns)


@pytest.mark.parametrize("caption", ["a red circle, click to enlarge", "IMG_0042.jpg a blue star",
                                     "an image of two hearts DSC864067.JPG",
                                     "click beetle on a leaf", "photo of a green ring", "red star - stock photo"])
def test_default_patterns_keep_honest_captions_with_boilerplate_around(caption):
    assert not any(re.search(p, caption) for p in FilterParams().boilerplate_patterns)


def test_bad_patterns_are_config_errors():
    with pytest.raises(ValueError, match="not a valid regex"):
        FilterParams(boilerplate_patterns=["(unclosed"])


OLD_THIRD_DEFAULT = (r"(?i)^\s*(click( \w+)? (to|for) [\w ]+|image|photo)\s*[.!]*\s*$")


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) when the body runs past a generous limit."""
    def expired(signum, frame):
        raise TimeoutError("the rules step did not finish within 10 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _rows(captions: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"uid": [f"u{i}" for i in range(len(captions))], "caption": captions,
                         "original_width": 300, "original_height": 300})


def test_click_to_and_20000_spaces_does_not_hang_the_rules_step(alarm):
    crafted = ["click to " + " " * 20000 + "#", "click to " + "ab " * 5000 + "#", "x" * 40000 + "#"]
    no_cap = FilterParams(max_caption_chars=None, min_words=None)
    assert list(rule_reasons(_rows(crafted), no_cap)) == [None, None, None]  # linear patterns, even uncapped
    for pattern in no_cap.boilerplate_patterns:
        for text in crafted:
            re.search(pattern, text)  # the patterns alone, without whitespace normalisation
    assert list(rule_reasons(_rows(crafted), FilterParams())) == ["max_caption_chars"] * 3


def test_over_long_caption_is_dropped_first_with_max_caption_chars():
    batch = _rows(["a red circle " * 100, "a red circle on white", "IMG_0042.jpg"])
    reasons = rule_reasons(batch, FilterParams(max_caption_chars=1000))
    assert list(reasons) == ["max_caption_chars", None, "min_words"]
    assert rule_reasons(batch, FilterParams(max_caption_chars=None))[0] is None
    decided = RulesStep(FilterParams(max_caption_chars=1000), CONTEXT).apply(batch)
    assert decided["reason"].tolist()[0] == "max_caption_chars" and "max_caption_chars" in RulesStep.reasons


def test_boilerplate_is_matched_after_whitespace_normalisation():
    batch = _rows(["  click \t to\n  enlarge  ", "image\u00a0 .", "a red   circle,  click to enlarge"])
    assert list(rule_reasons(batch, FilterParams(min_words=1, min_chars=1))) == ["boilerplate", "boilerplate", None]


@pytest.mark.parametrize("pattern", [OLD_THIRD_DEFAULT, r"(a+)+$", r"^(\w+\s?)+$", r"^\d+\w*x"])
def test_backtracking_user_patterns_are_config_errors(pattern):
    with pytest.raises(ValueError, match="grows faster than the caption's length"):
        FilterParams(boilerplate_patterns=[pattern])


def test_duplicates_are_found_across_shards_and_the_smallest_uid_wins():
    step = DedupStep(FilterParams(), CONTEXT)
    shards = [pd.DataFrame({"uid": ["u2", "u3", "u4"], "sha256": ["x", "y", "z"]}),
              pd.DataFrame({"uid": ["u1", "u5", "u6"], "sha256": ["x", "y", "y"]})]
    mapped = [step.map(batch) for batch in shards]
    state = DedupStep.combine(step.params, lambda: (step.partial(m) for m in mapped), lambda: iter(mapped))
    decided = pd.concat([step.decide(m, state) for m in mapped], ignore_index=True)
    assert decided.set_index("uid")["reason"].to_dict() == {
        "u2": "duplicate_image", "u3": None, "u4": None, "u1": None, "u5": "duplicate_image", "u6": "duplicate_image"}
    pd.testing.assert_frame_equal(decided, step.apply(pd.concat(shards, ignore_index=True)))
    keep_all = DedupStep(FilterParams(dedup_images=False), CONTEXT)
    assert keep_all.apply(pd.concat(shards, ignore_index=True))["keep"].all()


def test_the_dedup_combine_gives_the_winners_of_the_whole_pool_one_bucket_or_a_share_of_one_at_a_time(
        monkeypatch, tmp_path):
    """The partials spilled by bucket, and split again where a bucket exceeds the bound: the winners of the whole
    pool at once, and no part larger than the bound."""
    from clipmill.components.filter import step as filter_step

    rng = np.random.default_rng(3)
    hashes = [f"{h:064x}" for h in rng.integers(0, 2**62, 400)]
    shards = [pd.DataFrame({"uid": [f"u{s}{i:03d}" for i in range(300)],
                            "sha256": [hashes[j] for j in rng.integers(0, 400, 300)]}) for s in range(6)]
    dedup = DedupStep(FilterParams(), CONTEXT)
    partials = [dedup.partial(dedup.map(batch)) for batch in shards]
    whole = filter_step.repeated_winners(partials)
    assert len(whole) > 300 and (whole["uid"] == [min(u for b in shards for u, h in zip(b["uid"], b["sha256"])
                                                      if h == sha) for sha in whole["sha256"]]).all()
    by_bucket = DedupStep.combine(dedup.params, lambda: iter(partials), None)["winners"]
    pd.testing.assert_frame_equal(by_bucket, whole)
    monkeypatch.setattr(filter_step, "COMBINE_MEMORY", 60 * filter_step.ENTRY_BYTES)
    pd.testing.assert_frame_equal(DedupStep.combine(dedup.params, lambda: iter(partials), None)["winners"], whole)
    parts = list(filter_step.spilled_parts(lambda: iter(partials), tmp_path))
    assert len(parts) > filter_step.COMBINE_BUCKETS and max(len(p) for p in parts) <= 60
    assert sum(len(p) for p in parts) == sum(len(p) for p in partials) and not list(tmp_path.iterdir())


def test_a_pool_steps_map_fingerprint_holds_its_map_columns():
    """A map output stored with other columns than the step now makes is redone; its decisions' fingerprint does
    not depend on them."""
    import pyarrow as pa

    class Wider(DedupStep):
        map_columns = {**DedupStep.map_columns, "size": pa.int64()}

    params = FilterParams()
    assert Wider.fingerprint(params, CONTEXT, "map") != DedupStep.fingerprint(params, CONTEXT, "map")
    assert Wider.fingerprint(params, CONTEXT, "decide") == DedupStep.fingerprint(params, CONTEXT, "decide")


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_manifest_names_file_and_field(download, tmp_path, workers):
    table = download["table"]
    params = shrunk_params({**FILTER_STEPS, "curate.workers": workers})

    def curate_manifest(name: str, manifest: pd.DataFrame) -> None:
        manifest.to_parquet(tmp_path / name, index=False)
        run_curate({**download, "manifest": tmp_path / name}, tmp_path / name.replace(".parquet", ""), params)

    with pytest.raises(InputError, match=r"no_sha\.parquet: field 'sha256': missing column"):
        curate_manifest("no_sha.parquet", table.drop(columns=["sha256"]))
    with pytest.raises(InputError, match="dup.parquet: field 'uid': .* more than once"):
        curate_manifest("dup.parquet", pd.concat([table, table.head(1)]))
    assert not (tmp_path / "no_sha").exists() and not (tmp_path / "dup").exists()

    # Raised by a step (in a worker process when workers > 1), still naming the manifest.
    broken = table.copy()
    broken.loc[0, "original_width"] = None
    with pytest.raises(InputError, match=r"no_width\.parquet: field 'original_width': missing for successful"):
        curate_manifest("no_width.parquet", broken)
    broken = table.copy()
    broken.loc[1, "sha256"] = None
    with pytest.raises(InputError, match=r"no_hash\.parquet: field 'sha256': missing for successful"):
        curate_manifest("no_hash.parquet", broken)


def test_spam_step_drops_page_text_and_keyword_stuffing_and_keeps_honest_captions(default_params):
    from clipmill.components.common.steps import StepContext
    from clipmill.components.filter.spam import SpamStep

    honest = "a red circle on a white background - free download"  # two spam words: boilerplate, not stuffing
    stuffed = "a red circle buy cheap png clipart 4k"
    long_text = "a red circle. " + " ".join(["our gallery is updated every day"] * 10)
    batch = pd.DataFrame({"uid": ["a", "b", "c"], "caption": [honest, stuffed, long_text]})
    out = SpamStep(default_params.filter, StepContext(shards_dir=".")).apply(batch)
    assert list(out["reason"]) == [None, "keyword_stuffing", "caption_too_long"]
    off = default_params.filter.model_copy(update={"max_caption_words": None, "max_spam_words": None})
    assert SpamStep(off, StepContext(shards_dir=".")).apply(batch)["keep"].all()
