"""Content hashes for lineage: each file's bytes are read once, and a changed file is hashed again."""
from __future__ import annotations

import hashlib


def test_file_hashes_are_read_once_and_follow_changes(tmp_path, monkeypatch):
    from clipmill.components.common import hashing

    monkeypatch.setenv(hashing.HASH_CACHE_ENV, str(tmp_path / "cache.sqlite"))
    monkeypatch.setattr(hashing, "_cache", None)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x" * 1000)
    (data / "b.bin").write_bytes(b"y" * 500)
    before = hashing.bytes_hashed()
    first = hashing.content_hash([data])
    assert hashing.bytes_hashed() - before == 1500
    assert hashing.content_hash([data]) == first and hashing.bytes_hashed() - before == 1500  # from the cache
    (data / "b.bin").write_bytes(b"z" * 500)  # same size, new mtime: hashed again
    assert hashing.content_hash([data]) != first and hashing.bytes_hashed() - before == 2000
    assert hashing.file_sha256(data / "a.bin") == hashlib.sha256(b"x" * 1000).hexdigest()


def test_a_file_renamed_into_place_keeps_its_hash(tmp_path, monkeypatch):
    from clipmill.components.common import hashing

    monkeypatch.setenv(hashing.HASH_CACHE_ENV, str(tmp_path / "cache.sqlite"))
    monkeypatch.setattr(hashing, "_cache", None)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "shard.tar").write_bytes(b"s" * 4096)
    digest = hashing.file_sha256(tmp_path / "tmp" / "shard.tar")
    (tmp_path / "tmp").rename(tmp_path / "final")  # as an atomic write renames its temporary directory
    before = hashing.bytes_hashed()
    assert hashing.file_sha256(tmp_path / "final" / "shard.tar") == digest and hashing.bytes_hashed() == before
