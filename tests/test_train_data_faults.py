"""Training data faults: a damaged or oversized image is skipped and counted, and curated shards that changed
after reshard are refused before training."""
from __future__ import annotations

import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
import webdataset

from clipmill.components.common.errors import InputError
from clipmill.components.common.hashing import bytes_hashed, content_hash
from clipmill.components.common.model import MAX_IMAGE_PIXELS, ImageError, create_clip, decode_image
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.training.data import ResumableLoader, ShardStream, scan_shards
from clipmill.components.common.training.fit import train
from clipmill.components.common.training.params import TrainParams
from tests.test_train_shapes import write_shape_shards


def overwrite_member(tar_path: Path, member: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of one tar member in place (its size and the tar's layout unchanged)."""
    with tarfile.open(tar_path) as tar:
        start = tar.getmember(member).offset_data
    with open(tar_path, "r+b") as fh:
        fh.seek(start + offset)
        fh.write(data)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def keys_and_uids(shard: Path) -> list[tuple[str, str]]:
    return [(s["__key__"], json.loads(s["json"])["uid"]) for s in webdataset.WebDataset(str(shard), shardshuffle=False)]


def test_undecodable_and_oversized_images_are_image_errors_checked_before_decoding():
    with pytest.raises(ImageError, match="^undecodable: "):
        decode_image(b"\0" * 64)
    with pytest.raises(ImageError, match=r"^oversized: 9000x9000 pixels"):  # above ours, below PIL's own limit
        decode_image(png_header(9000, 9000))
    with pytest.raises(ImageError, match="^oversized: "):                 # above PIL's limit too
        decode_image(png_header(100_000, 100_000))
    assert 9000 * 9000 > MAX_IMAGE_PIXELS


def test_a_corrupt_jpeg_in_a_shard_is_skipped_and_counted_instead_of_aborting_training(tmp_path, caplog):
    [shard] = write_shape_shards(tmp_path / "shards", shards=1, per_shard=16)
    (bad_key, bad_uid), (big_key, big_uid) = keys_and_uids(shard)[5], keys_and_uids(shard)[11]
    overwrite_member(shard, f"{bad_key}.jpg", 0, b"\0" * 64)
    with webdataset.TarWriter(str(tmp_path / "shards" / "00001.tar")) as sink:  # plus a bomb's header, as a png
        sink.write({"__key__": big_key + "b", "png": png_header(9000, 9000), "txt": "a red circle",
                    "json": {"uid": big_uid + "b"}})
    clip = create_clip("clipmill-tiny")
    stream = ShardStream(scan_shards(str(tmp_path / "shards")).paths, transform=clip.train_transform,
                         tokenizer=clip.tokenizer, batch_size=17, batches_per_epoch=1, resampled=False,
                         shuffle_buffer=1)
    loader = ResumableLoader(stream, num_workers=0, epoch_fn=lambda: 0)
    with caplog.at_level(logging.WARNING):
        [batch] = list(loader)
    assert len(batch["uid"]) == 17 and batch["image"].shape[0] == 17  # the batch keeps its size
    assert bad_uid not in set(batch["uid"]) and big_uid + "b" not in set(batch["uid"])
    assert len(set(batch["uid"])) == 15 and loader.skipped_images == 2
    assert "skipped" not in batch
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any(bad_key in m and "undecodable" in m for m in skips) and any("oversized" in m for m in skips)


def test_a_training_run_counts_the_images_it_skipped(tmp_path):
    [shard] = write_shape_shards(tmp_path / "shards", shards=1, per_shard=16)
    overwrite_member(shard, f"{keys_and_uids(shard)[2][0]}.jpg", 0, b"\0" * 64)
    params = TrainParams(batch_size=16, samples_per_epoch=16, epochs=1, max_steps=1, num_workers=0,
                         shuffle_buffer=1, resampled=False, checkpoint_every_n_steps=0, cpu_threads=1)
    result = train(params, shards=str(tmp_path / "shards"), out_dir=tmp_path / "out", eval_dir=None, seed=0,
                   tracking=TrackingParams(enabled=False))
    assert result.steps == 1 and result.skipped_images == 1
    assert json.loads((tmp_path / "out" / "run.json").read_text())["skipped_images"] == 1


def test_a_batch_without_any_usable_image_is_an_input_error(tmp_path):
    with webdataset.TarWriter(str(tmp_path / "00000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": b"not a jpeg", "txt": "a red circle", "json": {"uid": "u1"}})
    clip = create_clip("clipmill-tiny")
    stream = ShardStream([str(tmp_path / "00000.tar")], transform=clip.train_transform, tokenizer=clip.tokenizer,
                         batch_size=1, batches_per_epoch=1, shuffle_buffer=1)
    with pytest.raises(InputError, match="none of its 1 images is usable") as err:
        list(ResumableLoader(stream, num_workers=0, epoch_fn=lambda: 0))
    assert err.value.file == str(tmp_path / "00000.tar") and err.value.field == "jpg"


def curated(root: Path) -> Path:
    """A reshard-like output: ``shards/`` and ``content_hash.txt`` beside it."""
    write_shape_shards(root / "shards", shards=2, per_shard=8)
    (root / "content_hash.txt").write_text(content_hash([root / "shards"]) + "\n")
    return root


def test_an_image_with_flipped_bytes_in_curated_shards_is_refused_before_training(tmp_path):
    root = curated(tmp_path / "curated")
    scan_shards(str(root))
    before = bytes_hashed()
    assert scan_shards(str(root / "shards")).total == 16  # both layouts are checked
    assert bytes_hashed() == before  # the hash cache: shards hashed once are not read again

    shard = root / "shards" / "00001.tar"
    key = keys_and_uids(shard)[4][0]
    overwrite_member(shard, f"{key}.jpg", 200, bytes(b ^ 0xFF for b in range(64)))
    params = TrainParams(batch_size=8, max_steps=1, num_workers=0, checkpoint_every_n_steps=0)
    with pytest.raises(InputError, match="no longer have this content hash") as err:
        train(params, shards=str(root), out_dir=tmp_path / "out", eval_dir=None, seed=0,
              tracking=TrackingParams(enabled=False))
    assert err.value.file == str(root / "content_hash.txt") and not (tmp_path / "out").exists()
