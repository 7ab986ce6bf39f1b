"""A shard's index read from its headers gives tarfile's answer, or leaves the tar to tarfile."""
from __future__ import annotations

import io
import tarfile

import pytest

from clipmill.components.common.errors import InputError
from clipmill.components.common.shards import index_shard, plain_index, split_member_name


def tarfile_index(path) -> dict:
    index: dict = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                key, field = split_member_name(member.name)
                index.setdefault(key, {})[field] = (member.offset_data, member.size)
    return index


def write_tar(path, members, fmt=tarfile.USTAR_FORMAT, directory=False, mtime=1_700_000_000, pax=None):
    with tarfile.open(path, "w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo("folder")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = len(data), mtime, dict(pax or {})
            tar.addfile(info, io.BytesIO(data))
    return path


SAMPLES = [(f"{key:09d}.{field}", bytes([key]) * size) for key in range(5)
           for field, size in (("jpg", 700 + key), ("txt", 12), ("json", 0))]


@pytest.mark.parametrize("case", ["ustar", "gnu", "pax", "ustar_prefix", "pax_float_mtime", "webdataset",
                                  "long_names_pax", "pax_comment", "directory"])
def test_the_index_is_tarfile_s(tmp_path, case):
    members = SAMPLES
    if case == "ustar_prefix":  # a name over 100 bytes is split into the header's prefix field
        members = [("d" * 90 + "/" + "e" * 20 + f"/{i:05d}.jpg", b"x" * i) for i in range(3)]
    if case == "long_names_pax":
        members = [("f" * 150 + f".{i}.jpg", b"y" * 9) for i in range(3)]
    pax_cases = ("pax", "pax_float_mtime", "long_names_pax", "pax_comment")
    fmt = tarfile.GNU_FORMAT if case == "gnu" else tarfile.PAX_FORMAT if case in pax_cases else tarfile.USTAR_FORMAT
    path = tmp_path / "a.tar"
    if case == "webdataset":  # img2dataset's writer: each member has a PAX header with its fractional mtime
        import webdataset

        with webdataset.TarWriter(str(path)) as writer:
            for i in range(5):
                writer.write({"__key__": f"{i:09d}", "jpg": b"j" * (700 + i), "txt": "t" * i})
    else:
        write_tar(path, members, fmt, directory=case == "directory",
                  mtime=1_700_000_000.25 if case == "pax_float_mtime" else 1_700_000_000,
                  pax={"comment": "a note"} if case == "pax_comment" else None)
    assert index_shard(path) == tarfile_index(path)
    fast = plain_index(path.read_bytes())
    if case in ("ustar", "gnu", "pax", "ustar_prefix", "pax_float_mtime", "webdataset"):  # read from the headers
        assert fast == tarfile_index(path)
    else:  # extended headers or other member types: left to tarfile
        assert fast is None


def test_a_damaged_tar_gets_tarfile_s_answer(tmp_path):
    good = write_tar(tmp_path / "good.tar", SAMPLES).read_bytes()
    cases = {"empty": b"", "zeros": bytes(10240), "cut_in_data": good[:3000], "cut_in_header": good[:2148],
             "bad_checksum": good[:148] + b"0000000\0" + good[156:],
             "bad_second_checksum": good[:1684] + b"0000000\0" + good[1692:]}
    outcomes = {}
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        try:
            expected = tarfile_index(path)
        except tarfile.TarError as e:
            with pytest.raises(InputError, match=f"not a readable tar shard \\({e}\\)"):
                index_shard(path)
            outcomes[name] = "error"
        else:
            assert index_shard(path) == expected
            outcomes[name] = len(expected)
    # tarfile stops quietly at an end block, a cut in a member's data or a later bad header
    assert outcomes == {"empty": "error", "zeros": 0, "cut_in_data": 1, "cut_in_header": "error",
                        "bad_checksum": "error", "bad_second_checksum": 1}
    with pytest.raises(InputError, match="no such shard"):
        index_shard(tmp_path / "missing.tar")
