"""The synthetic crawl: deterministic from the seed, realised rates as configured, clean held-out sets."""
from __future__ import annotations

import io
import json
import re
import tarfile

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageOps

from clipmill.cli import main
from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.hashing import content_hash, make_uid
from clipmill.components.demo_corpus import DEMO_BASE_URL, load_ground_truth
from clipmill.components.demo_corpus.corpus import generate_demo_corpus
from clipmill.components.demo_corpus.crawl import BEHAVIOURS, plan_crawl
from clipmill.components.demo_corpus.heldout import plan_retrieval, plan_trusted
from clipmill.components.demo_corpus.params import DemoCorpusParams
from clipmill.components.demo_corpus.render import render_scene
from clipmill.components.demo_corpus.vocabulary import COLOR_SYNONYMS, COLORS, CONCEPTS, SHAPE_WORDS
from clipmill.params import parse_params

from .conftest import REPO

NUM_PAIRS = 400
SEED = 7


def tiny_params(**overrides) -> DemoCorpusParams:
    base = dict(num_pairs=NUM_PAIRS, zeroshot_per_class=1, retrieval_size=40, trusted_size=60, trusted_shard_size=25,
                workers=1, images={"oversized": 0.02})
    return DemoCorpusParams(**{**base, **overrides})


def generate(root, params: DemoCorpusParams, seed: int = SEED) -> dict:
    return generate_demo_corpus(params, seed, root / "crawl", root / "eval", root / "trusted")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    summary = generate(root, tiny_params())
    return root, summary, load_ground_truth(root / "crawl" / "ground_truth.parquet")


def _web_hash(root) -> str:
    return content_hash([root / "crawl" / "web"])


def test_same_seed_gives_identical_output_with_any_worker_count(corpus, tmp_path):
    root, _, _ = corpus
    generate(tmp_path, tiny_params(workers=2))
    tables = ("crawl/urls.parquet", "crawl/ground_truth.parquet", "eval/zeroshot.parquet", "eval/retrieval.parquet")
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_parquet(root / table), pd.read_parquet(tmp_path / table))
    assert _web_hash(root) == _web_hash(tmp_path)
    assert content_hash([root / "trusted"]) == content_hash([tmp_path / "trusted"])
    assert (root / "crawl/summary.json").read_text() == (tmp_path / "crawl/summary.json").read_text()


@pytest.mark.parametrize("change", [{"seed": SEED + 1}, {"seed_offset": 1}])
def test_another_seed_gives_another_crawl(corpus, tmp_path, change):
    root, _, _ = corpus
    seed = change.get("seed", SEED)
    generate(tmp_path, tiny_params(seed_offset=change.get("seed_offset", 0)), seed=seed)
    a, b = pd.read_parquet(root / "crawl/urls.parquet"), pd.read_parquet(tmp_path / "crawl/urls.parquet")
    assert not set(a["uid"]) & set(b["uid"])
    assert _web_hash(root) != _web_hash(tmp_path)
    assert json.loads((root / "eval/suite.json").read_text())["version"] != \
        json.loads((tmp_path / "eval/suite.json").read_text())["version"]


def test_urls_table_and_uids(corpus):
    root, _, truth = corpus
    urls = pd.read_parquet(root / "crawl/urls.parquet")
    assert list(urls.columns) == ["uid", "url", "caption", "page_url", "crawl_date"]
    assert len(urls) == NUM_PAIRS and urls["uid"].is_unique and urls["url"].is_unique
    assert all(u.startswith(DEMO_BASE_URL + "/") for u in urls["url"])
    assert all(uid == make_uid(url, cap) for uid, url, cap in urls[["uid", "url", "caption"]].itertuples(index=False))
    assert set(truth["uid"]) == set(urls["uid"])


def test_realised_rates_match_the_configured_ones(corpus):
    _, summary, truth = corpus
    params = tiny_params()
    configured = {**params.behaviours.model_dump(), **params.caption_defects.model_dump(),
                  **params.image_defects.model_dump()}
    realised = {name: int((truth["behaviour"] == name).sum()) for name in BEHAVIOURS}
    realised.update({name: int(truth[name].sum()) for name in ("mismatched", "boilerplate_only", "exact_duplicate",
                                                               "near_duplicate")})
    for name, rate in configured.items():
        assert abs(realised[name] - rate * NUM_PAIRS) <= 1, name
        group = "behaviours" if name in BEHAVIOURS else "defects"
        assert summary[group][name]["count"] == realised[name]
    assert sum(realised[b] for b in BEHAVIOURS) == NUM_PAIRS
    noise = summary["caption_noise"]
    for kind in ("filename", "boilerplate", "foreign", "html_entities"):
        assert noise.get(kind, 0) > 0, kind
    assert summary["images"]["formats"].keys() == {"jpeg", "png", "webp"}
    assert {"L", "RGB"} <= summary["images"]["modes"].keys()
    assert summary["images"]["exif_rotated"] > 0


def test_rates_follow_the_params(tmp_path):
    others = dict.fromkeys(["transient_5xx", "slow", "truncated", "html_as_image", "robots_noai"], 0.0)
    params = tiny_params(num_pairs=200, behaviours={"not_found": 0.5, "redirect": 0.25, **others},
                         caption_defects={"mismatched": 0.3, "boilerplate_only": 0.0},
                         image_defects={"exact_duplicate": 0.1, "near_duplicate": 0.0})
    plan = plan_crawl(params, SEED)
    truth = pd.DataFrame(plan.pairs)
    counts = truth["behaviour"].value_counts().to_dict()
    assert counts == {"not_found": 100, "redirect": 50, "ok": 50}
    assert truth["mismatched"].sum() == 60 and not truth["boilerplate_only"].any()
    assert truth["exact_duplicate"].sum() == 20 and not truth["near_duplicate"].any()


def test_defects_are_what_the_ground_truth_says(corpus):
    _, _, truth = corpus
    by_uid = truth.set_index("uid")
    for row in truth[truth["mismatched"]].itertuples():
        assert not set(row.concepts) & set(by_uid.loc[row.caption_of, "concepts"])
    honest = truth[~truth["mismatched"] & ~truth["boilerplate_only"] & (truth["caption"] != "")]
    assert (honest["caption_of"] == honest["uid"]).all() and honest["caption_matches_image"].all()
    for row in truth[truth["exact_duplicate"]].itertuples():
        source = by_uid.loc[row.duplicate_of]
        assert row.image_sha256 == source.image_sha256 and row.url != source.url
    for row in truth[truth["near_duplicate"]].itertuples():
        source = by_uid.loc[row.duplicate_of]
        assert row.image_sha256 != source.image_sha256 and list(row.concepts) == list(source.concepts)
        assert row.near_duplicate_kind in ("reencode", "shift", "rescale")
    words = {w for names in SHAPE_WORDS.values() for pair in names for w in pair} | set(COLORS)
    for caption in truth.loc[truth["boilerplate_only"], "caption"]:
        assert not set(caption.lower().replace(".", " ").split()) & words, caption
    assert truth.loc[truth["caption_noise"].map(lambda k: "empty" in list(k)), "caption"].eq("").all()
    assert truth["caption_matches_image"].sum() < NUM_PAIRS


def test_grayscale_captions_name_no_color(corpus):
    _, _, truth = corpus
    color_words = set(COLORS) | {s for syn in COLOR_SYNONYMS.values() for s in syn}
    gray = truth[truth["grayscale"] & ~truth["mismatched"] & ~truth["boilerplate_only"]]
    assert len(gray)
    for row in gray.itertuples():
        words = set(row.caption.lower().replace("-", " ").split())
        assert not words & color_words, row.caption
        assert not set(row.true_caption.split()) & set(COLORS)


def test_served_files_decode_as_the_ground_truth_says(corpus):
    root, _, truth = corpus
    routes = json.loads((root / "crawl/web/routes.json").read_text())["routes"]
    served = truth[truth["behaviour"].isin(["ok", "transient_5xx", "slow", "truncated", "robots_noai", "redirect"])]
    for row in served.itertuples():
        path = row.url[len(DEMO_BASE_URL):]
        route = routes[path] if row.behaviour != "redirect" else routes[routes[path]["target"]]
        assert route["file"] == row.image_file
        with Image.open(root / "crawl/web" / row.image_file) as im:
            assert im.format.lower() == row.image_format and im.mode == row.image_mode
            assert route["content_type"] == f"image/{row.image_format}"
            assert ImageOps.exif_transpose(im).size == (row.width, row.height)
            assert im.getexif().get(0x0112, 1) == row.exif_orientation
    for row in truth[truth["behaviour"].isin(["not_found", "html_as_image"])].itertuples():
        assert "file" not in routes[row.url[len(DEMO_BASE_URL):]]
    assert truth["oversized"].any()
    assert truth.loc[truth["oversized"], ["width", "height"]].max(axis=1).min() >= 1000


def test_exif_rotated_jpegs_are_upright_once_the_tag_is_honored(corpus):
    root, _, truth = corpus
    plan = plan_crawl(tiny_params(), SEED)
    rotated = truth[truth["exif_orientation"] != 1].drop_duplicates("image_file")
    assert len(rotated)
    for row in rotated.itertuples():
        upright = render_scene(plan.files[row.image_file].scene).convert(row.image_mode).convert("RGB")
        upright = np.asarray(upright, dtype=np.float32)
        with Image.open(root / "crawl/web" / row.image_file) as im:
            raw = im.convert("RGB")
            honored = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32)
        if row.exif_orientation in (6, 8):
            assert raw.size == (row.height, row.width)
        assert np.abs(honored - upright).mean() < 8


def test_concepts_are_long_tailed(corpus):
    _, summary, truth = corpus
    concepts = summary["concepts"]
    assert abs(concepts["head_share"] - concepts["head_share_expected"]) < 0.08
    assert concepts["head_share"] > 4 * 0.1  # the top 10% of concepts hold far more than 10% of the objects
    seen = {c for cs in truth["concepts"] for c in cs}
    assert seen <= set(CONCEPTS)


def test_heldout_sets_are_clean_and_disjoint_from_the_crawl(corpus):
    root, _, truth = corpus
    import hashlib

    crawl_sha = set(truth["image_sha256"])
    zeroshot = pd.read_parquet(root / "eval/zeroshot.parquet")
    retrieval = pd.read_parquet(root / "eval/retrieval.parquet")
    classes = json.loads((root / "eval/zeroshot_classes.json").read_text())
    suite = json.loads((root / "eval/suite.json").read_text())
    assert classes["classes"] == list(CONCEPTS) and all("{}" in t for t in classes["templates"])
    assert (zeroshot["class_name"] == [classes["classes"][k] for k in zeroshot["label"]]).all()
    attributes = classes["attributes"]  # each class is its colour and its shape
    assert [f"{c} {s}" for c, s in zip(attributes["colour"], attributes["shape"])] == classes["classes"]
    assert suite["sets"]["zeroshot"]["size"] == len(zeroshot) == len(CONCEPTS)
    assert suite["sets"]["retrieval"]["size"] == len(retrieval) == 40 and suite["version"].startswith("demo-")
    assert all(len(set(c)) == 5 for c in retrieval["captions"])
    for table in (zeroshot, retrieval):
        assert not crawl_sha & set(table["image"].map(lambda b: hashlib.sha256(b).hexdigest()))
        assert not set(table["uid"]) & set(truth["uid"])
        assert Image.open(io.BytesIO(table["image"].iloc[0])).format == "PNG"


def test_trusted_shards_follow_the_sample_format(corpus):
    root, _, truth = corpus
    manifest = pd.read_parquet(root / "trusted/manifest.parquet")
    shards = sorted(p.name for p in (root / "trusted").glob("trusted-*.tar"))
    assert shards == ["trusted-000000.tar", "trusted-000001.tar", "trusted-000002.tar"]
    assert len(manifest) == 60 and manifest["uid"].is_unique and set(manifest["shard"]) == set(shards)
    samples: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(root / "trusted" / shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert set(samples) == set(manifest["uid"])
    captions = manifest.set_index("uid")["caption"]
    for key, sample in samples.items():
        assert sample.keys() == {"jpg", "txt", "json"}
        assert json.loads(sample["json"])["uid"] == key and sample["txt"].decode() == captions[key]
        assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
    assert not set(samples) & set(truth["uid"])


def _color_synonym_share(captions: list[str]) -> float:
    """Of the colour words in ``captions``, the share that are synonyms ('lemon', not 'yellow')."""
    synonyms = {w for ws in COLOR_SYNONYMS.values() for w in ws}
    words = [w for c in captions for w in re.findall(r"[a-z]+", c.lower()) if w in synonyms or w in COLORS]
    return sum(w in synonyms for w in words) / len(words)


def test_trusted_captions_use_synonyms_at_the_crawl_rate_and_heldout_ones_none():
    params = tiny_params(trusted_size=400, retrieval_size=20)
    trusted = [s.row["caption"] for s in plan_trusted(params, SEED)]
    assert abs(_color_synonym_share(trusted) - params.caption_noise.synonym) < 0.06
    assert _color_synonym_share([s.row["caption"] for s in plan_trusted(tiny_params(trusted_synonym=0.7), SEED)]) > 0.6
    assert _color_synonym_share([s.row["caption"] for s in plan_trusted(tiny_params(trusted_synonym=0), SEED)]) == 0
    assert _color_synonym_share([c for s in plan_retrieval(params, SEED) for c in s.row["captions"]]) == 0


def test_grayscale_trusted_images_have_captions_without_colors():
    planned = plan_trusted(tiny_params(trusted_size=200, trusted_grayscale=0.5), SEED)
    gray = [s for s in planned if s.encoding.mode == "L"]
    assert 0.4 < len(gray) / len(planned) < 0.6
    color_words = set(COLORS) | {w for ws in COLOR_SYNONYMS.values() for w in ws}
    for sample in planned:
        named = bool(set(re.findall(r"[a-z]+", sample.row["caption"].lower())) & color_words)
        assert named == (sample.encoding.mode != "L")
    assert all(s.encoding.mode != "L" for s in plan_trusted(tiny_params(trusted_grayscale=0), SEED))


def test_negative_rate_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"demo_corpus\.caption_defects\.mismatched: .*greater than or equal to 0"):
        parse_params({"demo_corpus": {"caption_defects": {"mismatched": -0.1}}})
    with pytest.raises(ConfigError, match=r"demo_corpus\.behaviours: .*rates add up to 1\.\d+, more than 1"):
        parse_params({"demo_corpus": {"behaviours": {"not_found": 0.6, "slow": 0.6}}})
    with pytest.raises(ConfigError, match=r"demo_corpus\.imagez: unknown key \(did you mean 'images'\?\)"):
        parse_params({"demo_corpus": {"imagez": {}}})


def test_load_ground_truth_names_the_missing_column(corpus, tmp_path):
    root, _, truth = corpus
    truth.drop(columns=["behaviour"]).to_parquet(tmp_path / "gt.parquet")
    with pytest.raises(InputError, match="field 'behaviour'"):
        load_ground_truth(tmp_path / "gt.parquet")
    with pytest.raises(InputError, match="no ground truth"):
        load_ground_truth(tmp_path / "missing.parquet")


def test_stage_cli_writes_outputs_and_records_an_mlflow_run(tmp_path, mlflow_uri, monkeypatch):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["demo_corpus"].update(num_pairs=150, zeroshot_per_class=1, retrieval_size=10, trusted_size=20, workers=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    rc = main(["stage", "demo_corpus", "--params", str(params), "--crawl-out", "out/crawl", "--eval-out", "out/eval",
               "--trusted-out", "out/trusted"])
    assert rc == 0
    for path in ("crawl/urls.parquet", "crawl/ground_truth.parquet", "crawl/summary.json", "crawl/web/routes.json",
                 "eval/suite.json", "trusted/manifest.parquet"):
        assert (tmp_path / "out" / path).exists(), path
    assert not list((tmp_path / "out").glob(".*.tmp"))
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=[data["tracking"]["experiment"]])
    assert len(runs) == 1 and runs.loc[0, "tags.clipmill.stage"] == "demo_corpus"
    assert runs.loc[0, "metrics.num_pairs"] == 150 and "metrics.behaviours.not_found.rate" in runs.columns
