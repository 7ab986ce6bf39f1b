"""CLIP-score step: thresholds (the exact pool-wide top fraction), equality with bare open_clip, scorer sources."""
from __future__ import annotations

import io
import json
import tarfile

import mlflow
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from clipmill.components.common.curation import read_step_table
from clipmill.components.common.errors import ClipmillError, ConfigError, InputError
from clipmill.components.common.model import create_clip, export_local_dir
from clipmill.components.common.shards import shard_file_name
from clipmill.components.common.steps import StepContext
from clipmill.components.score.params import ScoreParams
from clipmill.components.score.scoring import (
    key_buckets,
    next_in_shard,
    null_scores,
    sortable_keys,
    top_fraction_score,
)
from clipmill.components.score.step import ScoreStep
from tests.curation_fixtures import make_download
from tests.test_curate import run_curate, shrunk_params


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.manual_seed(0)
    return export_local_dir(create_clip("clipmill-tiny"), tmp_path_factory.mktemp("scorer") / "model")


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    return make_download(tmp_path_factory.mktemp("download"), n=60, per_shard=25)


def score_only(**score) -> dict:
    """Params changes that run the score step alone (every successful download is scored)."""
    return {"curate.steps": ["score"], **{f"score.{k}": v for k, v in score.items()}}


def bare_open_clip_scores(export_dir, images: list[bytes], captions: list[str]) -> np.ndarray:
    """The reference: open_clip's own loader, transforms and tokenizer, cosine of normalized features."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    model.eval()
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(tokenizer(captions))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (image_features * text_features).sum(-1).numpy()


def read_images(download, rows: pd.DataFrame) -> list[bytes]:
    out = []
    for shard, key in zip(rows["shard"], rows["key"]):
        with tarfile.open(download["shards"] / shard_file_name(shard)) as tar:
            out.append(tar.extractfile(f"{key}.jpg").read())
    return out


def mapped_frame(scores: np.ndarray, null: np.ndarray | None = None, prefix: str = "u") -> pd.DataFrame:
    """One shard's map output: its scores and its permutation-null scores (NaN: none)."""
    null = np.full(len(scores), np.nan, np.float32) if null is None else null
    return pd.DataFrame({"uid": [f"{prefix}{i}" for i in range(len(scores))], "clip_score": scores, "null_score": null})


def step_threshold(scores: np.ndarray, top_fraction: float | None, min_score: float | None) -> float | None:
    """The score step's threshold over one shard holding ``scores``."""
    params = ScoreParams(top_fraction=top_fraction, min_score=min_score)
    step = ScoreStep(params, StepContext(shards_dir="."))
    mapped = mapped_frame(scores)
    return ScoreStep.combine(params, lambda: iter([step.partial(mapped)]), lambda: iter([mapped]))["threshold"]


def test_top_fraction_threshold_keeps_ties():
    scores = np.array([0.1, 0.8, 0.9, 0.8, 0.8, 0.3], dtype=np.float32)
    # n = 6, f = 0.34: rank floor(2.04) = 2 of [0.9, 0.8, 0.8, 0.8, 0.3, 0.1] -> 0.8; all three 0.8 kept
    assert step_threshold(scores, 0.34, None) == pytest.approx(0.8)
    assert (scores >= step_threshold(scores, 0.34, None)).sum() == 4
    assert step_threshold(scores, 0.1, None) == pytest.approx(0.9)  # rank 0: the best score only
    assert step_threshold(scores, 0.5, None) == pytest.approx(0.8)  # rank 3, still a tie
    assert step_threshold(scores, 0.7, None) == pytest.approx(0.3)  # rank 4
    assert step_threshold(scores, 1.0, None) == pytest.approx(0.1)  # rank n: keep everything
    assert step_threshold(np.array([], dtype=np.float32), 0.5, None) is None


def test_absolute_threshold_and_both():
    scores = np.array([0.1, 0.24, 0.25, 0.3], dtype=np.float32)
    assert step_threshold(scores, None, 0.25) == 0.25
    assert (scores >= 0.25).sum() == 2
    assert step_threshold(scores, 0.75, 0.2) == pytest.approx(0.2)  # rank 3 -> 0.1, below the absolute 0.2
    assert step_threshold(scores, 0.25, 0.2) == pytest.approx(0.25)  # rank 1 -> 0.25 > 0.2
    assert step_threshold(scores, None, None) is None


def test_sortable_keys_order_like_the_scores():
    scores = np.array([-1.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.5, 1.0], dtype=np.float32)
    keys = sortable_keys(scores)
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert (np.argsort(keys, kind="stable") == np.argsort(scores, kind="stable")).all()


def random_pools():
    """(scores, top fraction, shard sizes): float32 cosines with ties, negatives, one score, f = 1, empty shards."""
    rng = np.random.default_rng(0)
    ties = rng.choice(np.array([-0.3, 0.1, 0.1000001, 0.25, 0.5], dtype=np.float32), 997)
    yield ties, 0.3, [500, 0, 497]
    for n, f in [(1, 0.3), (1, 1.0), (2, 0.5), (1000, 1.0), (1000, 0.001), (4099, 0.7), (20000, 0.3)]:
        scores = rng.uniform(-1, 1, n).astype(np.float32)
        cuts = np.sort(rng.integers(0, n + 1, 3))
        yield scores, f, np.diff([0, *cuts, n]).tolist()
    dense = (rng.normal(0.2, 1e-4, 30000)).astype(np.float32)  # many scores in one high-16-bit bucket
    yield dense, 0.3, [10000, 10000, 10000]


@pytest.mark.parametrize("scores, top_fraction, sizes", list(random_pools()))
def test_the_radix_top_fraction_is_the_exact_sorted_rank(scores, top_fraction, sizes, tiny_export):
    n = len(scores)
    expected = np.sort(scores)[::-1][min(int(np.floor(n * top_fraction)), n - 1)]
    shards = np.split(scores, np.cumsum(sizes)[:-1])

    buckets, counts = zip(*(key_buckets(s) for s in shards))
    buckets, counts = np.concatenate(buckets), np.concatenate(counts)
    total = pd.Series(counts).groupby(buckets).sum()
    in_bucket = lambda b: np.concatenate([s[(sortable_keys(s) >> 16) == b] for s in shards])  # noqa: E731
    assert top_fraction_score(total.index.to_numpy(), total.to_numpy(), top_fraction, in_bucket) == expected

    # The step's own partial and combine over the same shards.
    step = ScoreStep(ScoreParams(scorer=f"local-dir:{tiny_export}", top_fraction=top_fraction, device="cpu"),
                     StepContext(shards_dir="."))
    mapped = [mapped_frame(s) for s in shards]
    state = ScoreStep.combine(step.params, lambda: (step.partial(m) for m in mapped), lambda: iter(mapped))
    assert state["threshold"] == expected
    kept = sum(int(step.decide(m, state)["keep"].sum()) for m in mapped)
    assert kept == (scores >= expected).sum() >= min(int(np.floor(n * top_fraction)) + 1, n)


def test_scores_equal_bare_open_clip_cosine(download, tiny_export, tmp_path):
    params = shrunk_params(score_only(scorer=f"local-dir:{tiny_export}", top_fraction=0.5, batch_size=16))
    summary = run_curate(download, tmp_path, params)
    scores = read_step_table(tmp_path, "score")
    kept = download["table"][download["table"]["status"] == "success"]
    assert list(scores.columns) == ["uid", "keep", "reason", "clip_score"]
    assert scores["uid"].tolist() == kept["uid"].tolist()

    reference = bare_open_clip_scores(tiny_export, read_images(download, kept), kept["caption"].tolist())
    np.testing.assert_allclose(scores["clip_score"], reference, atol=1e-5)
    # the permutation null: each image with the caption of the next uid of its shard, cosine as open_clip's
    mapped = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "steps" / "score" / "map").rglob("*.parquet"))])
    mapped = mapped.set_index("uid").loc[kept["uid"]]
    partner_caption = {}
    for _, shard in kept.groupby("shard"):
        uids = sorted(shard["uid"])
        partner_caption.update({u: shard.set_index("uid").loc[uids[(i + 1) % len(uids)], "caption"]
                                for i, u in enumerate(uids)})
    null_reference = bare_open_clip_scores(tiny_export, read_images(download, kept),
                                           [partner_caption[u] for u in kept["uid"]])
    np.testing.assert_allclose(mapped["null_score"], null_reference, atol=1e-5)
    np.testing.assert_allclose(mapped["clip_score"], reference, atol=1e-5)

    n = len(scores)
    threshold = np.sort(scores["clip_score"].to_numpy())[::-1][n // 2]
    assert threshold == pytest.approx(np.sort(reference)[::-1][n // 2], abs=1e-5)
    [step] = summary["steps"]
    assert step["threshold"] == threshold
    assert scores["keep"].sum() == (scores["clip_score"] >= threshold).sum() >= n // 2 + 1
    assert set(scores.loc[~scores["keep"], "reason"]) == {"low_clip_score"}
    assert scores.loc[scores["keep"], "reason"].isna().all()
    assert step["input"] == n and step["kept"] + step["dropped"]["low_clip_score"] == n and step["shards"] == 3
    assert json.loads((tmp_path / "steps" / "score" / "summary.json").read_text()) == step


def test_config_name_with_checkpoint_equals_export(download, tiny_export, tmp_path):
    params = shrunk_params(score_only(scorer="clipmill-tiny", top_fraction=None, min_score=0.0,
                                      checkpoint=str(tiny_export / "open_clip_model.safetensors")))
    run_curate(download, tmp_path / "a", params)
    run_curate(download, tmp_path / "b", shrunk_params(score_only(scorer="bootstrap", top_fraction=None,
                                                                  min_score=0.0)), tiny_export)
    a, b = (read_step_table(tmp_path / d, "score") for d in "ab")
    np.testing.assert_allclose(a["clip_score"], b["clip_score"], atol=1e-6)
    assert (a["keep"] == (a["clip_score"] >= 0.0)).all()


def test_config_name_without_checkpoint_is_a_config_error_before_any_work(download, tmp_path):
    with pytest.raises(ConfigError, match="score.checkpoint must name its weights"):
        run_curate(download, tmp_path / "out", shrunk_params({"score.scorer": "clipmill-tiny"}))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="checkpoint is only used"):
        ScoreParams(scorer="bootstrap", checkpoint="weights.safetensors")


def test_missing_bootstrap_model_names_the_path(download, tmp_path):
    with pytest.raises(InputError, match="absent/model: no bootstrap scorer export here"):
        run_curate(download, tmp_path / "out", shrunk_params(), tmp_path / "absent" / "model")
    assert not (tmp_path / "out").exists()


class _ExportHolder(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def test_registry_uri_absent_is_a_clear_error_and_present_resolves(download, tiny_export, tmp_path, mlflow_uri):
    champion = shrunk_params({**score_only(scorer="models:/clipmill@champion", top_fraction=None),
                              "tracking.tracking_uri": mlflow_uri})
    with pytest.raises(ClipmillError, match="models:/clipmill@champion"):
        run_curate(download, tmp_path / "absent", champion)
    assert not list((tmp_path / "absent").rglob("score/*.done"))

    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=_ExportHolder(),
                                       artifacts={"open_clip": str(tiny_export)}, pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, "clipmill")
    mlflow.MlflowClient().set_registered_model_alias("clipmill", "champion", version.version)

    run_curate(download, tmp_path / "registry", champion)
    run_curate(download, tmp_path / "local", shrunk_params(score_only(scorer=f"local-dir:{tiny_export}",
                                                                      top_fraction=None)))
    registry, local = (read_step_table(tmp_path / d, "score") for d in ("registry", "local"))
    np.testing.assert_allclose(registry["clip_score"], local["clip_score"], atol=1e-6)
    assert registry["keep"].all()
    assert json.loads((tmp_path / "registry" / "steps" / "score" / "summary.json").read_text())["threshold"] is None


def overwrite_member(tar_path, member: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of one tar member in place (its size and the tar's layout unchanged)."""
    with tarfile.open(tar_path) as tar:
        start = tar.getmember(member).offset_data
    with open(tar_path, "r+b") as fh:
        fh.seek(start + offset)
        fh.write(data)


def test_an_undecodable_image_is_dropped_and_counted_instead_of_aborting_the_score_step(download, tiny_export,
                                                                                          tmp_path):
    import shutil

    corrupt = dict(download, shards=tmp_path / "shards")
    shutil.copytree(download["shards"], corrupt["shards"])
    kept = download["table"][download["table"]["status"] == "success"]
    victim = kept.iloc[3]
    overwrite_member(corrupt["shards"] / shard_file_name(victim["shard"]), f"{victim['key']}.jpg", 0, b"\0" * 64)
    params = shrunk_params(score_only(scorer=f"local-dir:{tiny_export}", top_fraction=0.5, batch_size=16))
    summary = run_curate(corrupt, tmp_path / "curate", params)

    scores = read_step_table(tmp_path / "curate", "score").set_index("uid")
    assert (scores.loc[victim["uid"], "reason"] == "unreadable_image"
            and np.isnan(scores.loc[victim["uid"], "clip_score"]))
    others = scores.drop(index=victim["uid"])
    n = len(others)  # the threshold ranks the readable images only
    assert others["clip_score"].notna().all()
    [step] = summary["steps"]
    assert step["dropped"]["unreadable_image"] == 1 and step["input"] == n + 1
    assert step["kept"] + step["dropped"]["low_clip_score"] == n
    assert step["threshold"] == np.sort(others["clip_score"].to_numpy())[::-1][n // 2]
    assert step["mean_clip_score"] == pytest.approx(float(others["clip_score"].astype(np.float64).mean()))
    [check] = ScoreStep.expectations(params.score, scores.reset_index(), str(tmp_path))
    assert check[1]["clip_score"].notna().all() and len(check[1]) == n


# --- the calibrated threshold (two-component mixture of the pool's scores) -------------------------------------

def planted_pool(n_matched: int = 3000, n_mismatched: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 cosines of a pool with planted mismatched pairs: (scores, is_mismatched)."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(0.55, 0.08, n_matched), rng.normal(0.05, 0.1, n_mismatched)])
    return np.clip(scores, -1, 1).astype(np.float32), np.r_[np.zeros(n_matched, bool), np.ones(n_mismatched, bool)]


def mixture_state(scores: np.ndarray, sizes: list[int], null: np.ndarray | None = None, **threshold) -> dict:
    params = ScoreParams(top_fraction=None, **threshold)
    step = ScoreStep(params, StepContext(shards_dir="."))
    cuts = np.cumsum(sizes)[:-1]
    nulls = np.split(null, cuts) if null is not None else [None] * len(sizes)
    mapped = [mapped_frame(s, n, f"s{i}-") for i, (s, n) in enumerate(zip(np.split(scores, cuts), nulls))]
    return ScoreStep.combine(params, lambda: (step.partial(m) for m in mapped), lambda: iter(mapped))


def test_mixture_threshold_separates_planted_mismatches_from_shard_histograms_alone():
    scores, mismatched = planted_pool()
    rng = np.random.default_rng(1)
    order = rng.permutation(len(scores))
    scores, mismatched = scores[order], mismatched[order]
    state = mixture_state(scores, [1000, 0, 1500, 1100], mixture_posterior=0.5)
    mixture, threshold = state["mixture"], state["threshold"]
    assert mixture["mean"][0] == pytest.approx(0.05, abs=0.03) and mixture["mean"][1] == pytest.approx(0.55, abs=0.03)
    assert mixture["weight"][0] == pytest.approx(600 / 3600, abs=0.03)
    assert state["calibrated_threshold"] == threshold and 0.15 < threshold < 0.45
    dropped = scores < threshold
    precision, recall = (dropped & mismatched).sum() / dropped.sum(), (dropped & mismatched).sum() / mismatched.sum()
    assert precision >= 0.9 and recall >= 0.9
    # the shards' partials are histograms: the same pool cut into other shards gives the same threshold
    assert mixture_state(scores, [3600], mixture_posterior=0.5)["threshold"] == pytest.approx(threshold)


def test_a_higher_posterior_moves_the_calibrated_threshold_up_and_min_score_still_applies_above_it():
    scores, _ = planted_pool()
    low = mixture_state(scores, [3600], mixture_posterior=0.1)["threshold"]
    high = mixture_state(scores, [3600], mixture_posterior=0.99)["threshold"]
    assert low < high
    assert mixture_state(scores, [3600], mixture_posterior=0.5, min_score=0.5)["threshold"] == 0.5
    assert mixture_state(scores, [3600])["mixture"] is None  # off unless asked for


def test_changing_the_threshold_mode_recomputes_no_scores():
    context = StepContext(shards_dir=".")
    base, calibrated = ScoreParams(), ScoreParams(top_fraction=None, mixture_posterior=0.5)
    assert ScoreStep.fingerprint(base, context, "map") == ScoreStep.fingerprint(calibrated, context, "map")
    assert ScoreStep.fingerprint(base, context, "decide") != ScoreStep.fingerprint(calibrated, context, "decide")


def test_the_bootstrap_scorer_is_fingerprinted_by_its_bytes_not_its_place(tiny_export, tmp_path):
    """The same scorer export in another checkout gives the same curation fingerprints (a reproduction in a fresh
    clone reuses nothing, but writes the same markers); other bytes give another fingerprint."""
    import shutil

    copy = shutil.copytree(tiny_export, tmp_path / "elsewhere" / tiny_export.name)
    params = ScoreParams(scorer="bootstrap")

    def fingerprint(model) -> str:
        return ScoreStep.fingerprint(params, StepContext(shards_dir="s", inputs={"bootstrap_model": str(model)}), "map")

    assert fingerprint(copy) == fingerprint(tiny_export)
    weights = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert fingerprint(copy) != fingerprint(tiny_export)


# --- the calibrated threshold of the permutation null (images scored against other samples' captions) -----------

def test_the_null_partner_is_the_next_sample_of_the_download_shard_whoever_else_is_kept():
    shard = np.array([f"{i:04x}" for i in np.random.default_rng(0).permutation(50)])
    partners = next_in_shard(shard, shard)
    assert sorted(partners) == sorted(shard) and (partners != shard).all()
    order = sorted(shard)
    assert partners[shard == order[-1]][0] == order[0]  # cyclic
    some = shard[::7]  # the samples earlier steps kept: their partners do not change
    np.testing.assert_array_equal(next_in_shard(some, shard), partners[::7])
    assert next_in_shard(np.array(["only"]), np.array(["only"])).tolist() == [None]
    image, text = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[[1, 2, 0]]
    np.testing.assert_array_equal(null_scores(image, text, np.array([2, -1, 0])), [1.0, np.nan, 0.0])


def test_a_samples_scores_do_not_depend_on_which_other_samples_it_is_scored_with(download, tiny_export):
    """What an increment stores for a sample is what a from-scratch run computes for it: a shard's score input
    changes when a later crawl moves a duplicate decision, and the samples new to the step are scored alone."""
    step = ScoreStep(ScoreParams(scorer=f"local-dir:{tiny_export}", top_fraction=0.5, device="cpu", batch_size=4),
                     StepContext(shards_dir=str(download["shards"])))
    table = download["table"]
    rows = table[(table["status"] == "success") & (table["shard"] == table["shard"].iloc[0])]
    batch = rows[["uid", "shard", "key", "caption"]].reset_index(drop=True)
    whole = step.map(batch).set_index("uid")
    for subset in (batch.iloc[[3]], batch.iloc[::3], batch.iloc[1:6], batch.iloc[::-1]):
        part = step.map(subset.reset_index(drop=True)).set_index("uid")
        pd.testing.assert_frame_equal(part, whole.loc[part.index])


def test_null_recall_threshold_is_the_exact_null_quantile_and_drops_that_share_of_planted_mismatches():
    scores, mismatched = planted_pool()
    rng = np.random.default_rng(2)
    order = rng.permutation(len(scores))
    scores, mismatched = scores[order], mismatched[order]
    null = np.clip(rng.normal(0.05, 0.1, len(scores)), -1, 1).astype(np.float32)  # pairs mismatched on purpose
    null[:7] = np.nan  # unreadable images and one-sample shards have no null score
    state = mixture_state(scores, [1000, 0, 1500, 1100], null, null_recall=0.8)
    valid = np.sort(null[~np.isnan(null)])
    assert state["threshold"] == state["null_threshold"] == valid[int(np.floor(len(valid) * 0.8))]
    dropped = scores < state["threshold"]
    recall = (dropped & mismatched).sum() / mismatched.sum()
    assert recall == pytest.approx(0.8, abs=0.05) and (dropped & mismatched).sum() / dropped.sum() >= 0.9
    assert mixture_state(scores, [3600], null, null_recall=0.8)["threshold"] == state["threshold"]
    assert mixture_state(scores, [3600], null, null_recall=0.5)["threshold"] < state["threshold"]
    assert mixture_state(scores, [3600], null, null_recall=0.8, min_score=0.5)["threshold"] == 0.5
    assert mixture_state(scores, [3600], null)["null_threshold"] is None  # off unless asked for
    assert mixture_state(scores, [3600], np.full(3600, np.nan, np.float32), null_recall=0.8)["threshold"] is None


def test_changing_the_null_recall_recomputes_no_scores():
    context = StepContext(shards_dir=".")
    base, null = ScoreParams(), ScoreParams(top_fraction=None, null_recall=0.8)
    assert ScoreStep.fingerprint(base, context, "map") == ScoreStep.fingerprint(null, context, "map")
    assert ScoreStep.fingerprint(base, context, "decide") != ScoreStep.fingerprint(null, context, "decide")


def test_a_sample_embedded_alone_gets_its_embedding_from_any_batch():
    """A row of a partial block of rows (a batch of one included) takes kernels that round otherwise: batches are
    padded to whole blocks, so a row's embedding is the same alone, at any place in any batch."""
    from clipmill.components.common.model import embed_images, embed_texts

    torch.manual_seed(0)
    clip = create_clip("clipmill-tiny")
    size = clip.model.visual.image_size
    pixels = torch.rand(5, 3, *((size, size) if isinstance(size, int) else size))
    texts = ["a red square on a white background", "two blue circles", "x", "a photo", "IMG_1.jpg"]
    with torch.inference_mode():
        assert torch.equal(embed_images(clip, pixels)[2:3], embed_images(clip, pixels[2:3]))
        assert torch.equal(embed_texts(clip, texts)[2:3], embed_texts(clip, texts[2:3]))
        assert torch.equal(embed_images(clip, pixels, batch_size=3)[1:5], embed_images(clip, pixels[1:5]))
