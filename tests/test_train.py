"""Training stage: export round trip, the shard stream, a tiny run that learns (CLI + MLflow), kill and resume."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import pytest
import torch
import webdataset
import yaml
from safetensors.torch import load_file

from clipmill.components.common.errors import InputError
from clipmill.components.common.hashing import content_hash
from clipmill.components.common.io import OUTPUT_MARKER
from clipmill.components.common.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    create_clip,
    embed_images,
    embed_texts,
    export_local_dir,
    load_clip,
    read_state_dict,
)
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.training.data import ResumableLoader, ShardStream, scan_shards
from clipmill.components.common.training.fit import train
from clipmill.components.common.training.params import TrainParams
from clipmill.components.train import cli as train_cli
from tests.test_train_shapes import CLASSES, render, run_stage, write_shape_evalsets, write_shape_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shape_shards(out, shards=4, per_shard=48)
    return out


@pytest.fixture(scope="module")
def evalsets(tmp_path_factory) -> Path:
    return write_shape_evalsets(tmp_path_factory.mktemp("eval"), per_class=3, retrieval_size=12)


def _images(n=4):
    import random

    rng = random.Random(5)
    return [render(c.split()[0], c.split()[1], rng) for c in CLASSES[:n]]


# --- model export -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clipmill-tiny", "clipmill-tiny-rn"])
def test_export_round_trip_loads_in_open_clip_with_the_same_embeddings(tmp_path, name):
    torch.manual_seed(0)
    clip = create_clip(name, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    export_local_dir(clip, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [OUTPUT_MARKER, CONFIG_FILE, WEIGHTS_FILE]

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'model'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'model'}")
    model.eval()
    images, texts = _images(), ["a red circle", "a blue square", "green triangle"]
    import io

    from PIL import Image

    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        ref_images = model.encode_image(pixels, normalize=True)
        ref_texts = model.encode_text(tokenizer(texts), normalize=True)
    assert torch.allclose(embed_images(clip, images), ref_images, atol=1e-5)
    assert torch.allclose(embed_texts(clip, texts), ref_texts, atol=1e-5)
    assert model.logit_bias.item() == -10.0

    loaded = load_clip(str(tmp_path / "model"))
    assert torch.allclose(embed_images(loaded, images), ref_images, atol=1e-5)
    warm = create_clip(name, init_from=f"local-dir:{tmp_path / 'model'}", init_logit_bias=-10.0)
    assert all(torch.equal(a, b) for a, b in zip(warm.model.state_dict().values(), clip.model.state_dict().values()))


def test_weights_are_never_unpickled(tmp_path):
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": pl.Callback()}, bad)
    with pytest.raises(InputError, match="weights-only"):
        read_state_dict(bad)


# --- the shard stream ---------------------------------------------------------------------------------------

def _stream(shards, **kw):
    clip = create_clip("clipmill-tiny")
    args = dict(transform=clip.train_transform, tokenizer=clip.tokenizer, batch_size=8, batches_per_epoch=7,
                shuffle_buffer=32)
    return ShardStream(scan_shards(str(shards)).paths, **{**args, **kw})


def _epoch(loader):
    return [(list(b["uid"]), b["image"]) for b in loader]


def test_stream_resumes_mid_epoch_with_the_same_batches(shards):
    full = _epoch(ResumableLoader(_stream(shards), num_workers=2, epoch_fn=lambda: 0))
    assert len(full) == 7 and all(len(uids) == 8 for uids, _ in full)
    again = _epoch(ResumableLoader(_stream(shards), num_workers=2, epoch_fn=lambda: 0))
    assert ([u for u, _ in again] == [u for u, _ in full]
            and all(torch.equal(a, b) for (_, a), (_, b) in zip(again, full)))

    resumed = ResumableLoader(_stream(shards), num_workers=2, epoch_fn=lambda: 0)
    resumed.load_state_dict({**resumed.state_dict(), "batches_taken": 3})  # odd: workers deliver out of order
    tail = _epoch(resumed)
    assert [u for u, _ in tail] == [u for u, _ in full[3:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tail, full[3:]))
    assert resumed.state_dict()["batches_taken"] == 7

    next_epoch = _epoch(ResumableLoader(_stream(shards), num_workers=2, epoch_fn=lambda: 1))
    assert [u for u, _ in next_epoch] != [u for u, _ in full]


def test_captions_are_drawn_from_original_and_rewrites_per_sample_and_epoch(tmp_path):
    write_shape_shards(tmp_path, shards=1, per_shard=4, seed=3)
    sample = next(iter(webdataset.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)))
    uid, options = json.loads(sample["json"])["uid"], [sample["txt"].decode()] + json.loads(sample["json"])["rewrites"]
    stream = _stream(tmp_path, batch_size=4, batches_per_epoch=1, shuffle_buffer=1)
    tokens = {tuple(stream.tokenizer([o])[0].tolist()): o for o in options}

    def caption(epoch):
        stream.set_position(epoch, 0)
        batch = next(iter(stream))
        return tokens[tuple(batch["text"][list(batch["uid"]).index(uid)].tolist())]

    seen = [caption(e) for e in range(30)]
    assert set(seen) == set(options)          # every option is drawn ...
    assert caption(4) == seen[4]               # ... the same one for the same epoch
    stream.sample_rewrites = False
    assert {caption(e) for e in range(5)} == {options[0]}


def test_without_resampling_ranks_read_their_own_shards(shards):
    paths = scan_shards(str(shards)).paths
    uids_of = {p: {json.loads(s["json"])["uid"] for s in webdataset.WebDataset(p, shardshuffle=False)} for p in paths}
    for rank in range(2):
        seen = {u for b in _stream(shards, rank=rank, world_size=2, resampled=False, batches_per_epoch=10)
                for u in b["uid"]}
        own = set().union(*(uids_of[p] for p in paths[rank::2]))
        assert seen <= own and len(seen) > 48  # from both of its shards, from no other


def test_bad_samples_and_missing_shards_are_input_errors(tmp_path):
    with webdataset.TarWriter(str(tmp_path / "00000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": b"not a jpeg", "txt": "a red circle", "json": {"uid": "u1"}})
    loader = ResumableLoader(_stream(tmp_path, batch_size=1, batches_per_epoch=1, shuffle_buffer=1),
                             num_workers=1, epoch_fn=lambda: 0)
    with pytest.raises(InputError) as err:
        list(loader)
    assert err.value.file == str(tmp_path / "00000.tar") and err.value.field == "jpg"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .tar shards"):
        scan_shards(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        scan_shards(str(tmp_path / "{00000..00001}.tar"))


# --- a tiny run, through the CLI, tracked in MLflow ---------------------------------------------------------

def test_tiny_run_learns_and_is_tracked(tmp_path, shards, evalsets, mlflow_uri, default_params):
    import mlflow

    params = default_params.model_dump(mode="json")
    params["train"].update(batch_size=32, samples_per_epoch=320, epochs=4, num_workers=1, shuffle_buffer=64,
                           warmup_steps=5, lr=1e-3, checkpoint_every_n_steps=20, val_every_n_steps=20,
                           log_every_n_steps=5, cpu_threads=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"config_key": "train", "overrides": {"lr": 2e-3}, "metric": "m", "value": 0}))
    out = tmp_path / "train"
    rc = run_stage(train_cli, tmp_path / "params.yaml", ["--shards", str(shards), "--eval-dir", str(evalsets),
                                                          "--out", str(out), "--best-params", str(best)])
    assert rc == 0
    assert sorted(p.name for p in (out / "model").iterdir()) == [OUTPUT_MARKER, CONFIG_FILE, WEIGHTS_FILE]
    assert {"last.ckpt", "fingerprint.json"} <= {p.name for p in (out / "checkpoints").iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    run_info = json.loads((out / "run.json").read_text())
    assert metrics["step"] == run_info["steps"] == 40 and run_info["samples_seen"] == 40 * 32
    assert metrics["val/zeroshot/acc1"] > 3 / len(CLASSES)  # chance is 1/12
    assert metrics["val/retrieval/text_to_image_recall_at_5"] > 5 / 12

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(run_info["run_id"])
    assert run.data.params["lr"] == "0.002"  # tuned value applied over the section
    tags = run.data.tags
    assert tags["clipmill.stage"] == "train" and tags["clipmill.git_commit"] != ""
    assert tags["clipmill.data_hash"] == content_hash(scan_shards(str(shards)).paths)
    assert tags["clipmill.eval_data_hash"] == content_hash([evalsets]) and "clipmill.dvc_lock_hash" in tags
    loss = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(loss) >= 8 and sum(loss[-3:]) / 3 < 0.8 * sum(loss[:3]) / 3
    for key in ("train/logit_scale", "train/lr", "train/device/samples_per_sec", "val/zeroshot/acc1",
                "val/retrieval/modality_gap", "samples_per_s", "skipped_images"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "checkpoints", "metrics.json", "run.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        f"model/{OUTPUT_MARKER}", f"model/{CONFIG_FILE}", f"model/{WEIGHTS_FILE}"}


def test_the_resnet_tower_trains_exports_and_names_shapes(tmp_path, shards, evalsets):
    """clipmill-tiny-rn (open_clip's ModifiedResNet, batch norm included) goes through the same training, export and
    reload as the ViT tower, and learns the shape data (chance 1/12)."""
    params = TrainParams(model="clipmill-tiny-rn", batch_size=32, samples_per_epoch=320, epochs=4, num_workers=1,
                         shuffle_buffer=64, warmup_steps=5, lr=1e-3, checkpoint_every_n_steps=0,
                         val_every_n_steps=0, log_every_n_steps=5, cpu_threads=1)
    result = train(params, shards=str(shards), out_dir=tmp_path / "train", eval_dir=evalsets, seed=0,
                   tracking=TrackingParams(enabled=False))
    assert result.steps == 40
    assert result.metrics["val/zeroshot/acc1"] > 3 / len(CLASSES)
    loaded = load_clip(str(tmp_path / "train" / "model"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.visual.modules())
    images = _images()  # batch norm in eval mode: an image's embedding does not depend on its batch
    alone = torch.cat([embed_images(loaded, [image]) for image in images])
    assert torch.allclose(embed_images(loaded, images), alone, atol=1e-5)


# --- kill and resume ----------------------------------------------------------------------------------------

RESUME_PARAMS = dict(batch_size=16, samples_per_epoch=192, epochs=2, num_workers=2, shuffle_buffer=64, warmup_steps=2,
                     checkpoint_every_n_steps=5, val_every_n_steps=0, cpu_threads=1, log_every_n_steps=5)
# A seeded random step (CLIPMILL_FAULT_SEED) between the first checkpoint and the end of the 24 steps; a checkpoint
# every 5 steps, written after the step's other callbacks, so the resumed run starts from the last multiple of 5
# before it.
FAULT_SEED = int(os.environ.get("CLIPMILL_FAULT_SEED", "7"))
KILL_AT_STEP = random.Random(f"{FAULT_SEED}:train").randint(6, 23)
LAST_CHECKPOINT = 5 * ((KILL_AT_STEP - 1) // 5)


class RecordBatches(pl.Callback):
    def __init__(self):
        self.seen: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = list(batch["uid"])


class KillAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _run_killed_at(params: TrainParams, shards: Path, out_dir: Path) -> None:
    train(params, shards=str(shards), out_dir=out_dir, eval_dir=None, seed=0, tracking=TrackingParams(enabled=False),
          extra_callbacks=[KillAt(KILL_AT_STEP)])


def test_killed_run_resumes_mid_epoch_with_the_same_samples_and_weights(tmp_path, shards):
    params = TrainParams(**RESUME_PARAMS)
    off = TrackingParams(enabled=False)
    straight = RecordBatches()
    train(params, shards=str(shards), out_dir=tmp_path / "a", eval_dir=None, seed=0, tracking=off,
          extra_callbacks=[straight])

    # fork: the killed run inherits the imported modules instead of importing them again
    killed = multiprocessing.get_context("fork").Process(target=_run_killed_at, args=(params, shards, tmp_path / "b"))
    killed.start()
    killed.join(timeout=300)
    assert killed.exitcode == -signal.SIGKILL
    assert not (tmp_path / "b" / "model").exists()  # nothing that looks complete

    resumed = RecordBatches()
    result = train(params, shards=str(shards), out_dir=tmp_path / "b", eval_dir=None, seed=0, tracking=off,
                   extra_callbacks=[resumed])
    assert result.resumed_from.endswith("last.ckpt") and result.steps == 24
    assert sorted(resumed.seen) == list(range(LAST_CHECKPOINT, 24))
    assert all(resumed.seen[s] == straight.seen[s] for s in resumed.seen)
    a, b = load_file(tmp_path / "a" / "model" / WEIGHTS_FILE), load_file(tmp_path / "b" / "model" / WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
