"""Atomic writes: the output-directory guard (a marker names the stage that owns a directory) and the removal of
temporary outputs that a killed write left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clipmill.cli import main
from clipmill.components.common.errors import InputError
from clipmill.components.common.io import (
    OUTPUT_MARKER,
    atomic_path,
    output_owner,
    remove_dead_writes,
    write_json,
    write_parquet,
)

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_dir(path: Path, owner: str, text: str) -> None:
    with atomic_path(path, owner=owner) as tmp:
        tmp.mkdir()
        (tmp / "data.txt").write_text(text)


def test_a_directory_output_carries_its_owner_marker_and_is_replaced_by_that_owner(tmp_path):
    out = tmp_path / "out"
    _write_dir(out, "reshard", "one")
    assert output_owner(out) == "reshard"
    assert (out / OUTPUT_MARKER).read_text() == "reshard\n"  # deterministic: part of the output's hash
    _write_dir(out, "reshard", "two")
    assert (out / "data.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_replacing_an_unmarked_directory_refuses_and_deletes_nothing(tmp_path):
    out = tmp_path / "checkout"
    (out / ".git").mkdir(parents=True)
    (out / "work.py").write_text("uncommitted")
    before = _tree(out)
    with pytest.raises(InputError, match=f"refusing to replace this directory: it holds files but no {OUTPUT_MARKER}"):
        _write_dir(out, "reshard", "x")
    with pytest.raises(InputError, match="refusing to replace"):
        write_json({"a": 1}, out)  # a file written in place of the directory
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout"]


def test_another_stages_output_directory_is_not_replaced(tmp_path):
    out = tmp_path / "curated"
    _write_dir(out, "reshard", "shards")
    with pytest.raises(InputError, match="output directory of 'reshard', not of 'demo_urls'"):
        _write_dir(out, "demo_urls", "x")
    assert (out / "data.txt").read_text() == "shards"


def test_an_empty_directory_and_a_missing_path_may_be_written(tmp_path):
    (tmp_path / "empty").mkdir()
    _write_dir(tmp_path / "empty", "report", "a")
    _write_dir(tmp_path / "new", "report", "b")
    assert (tmp_path / "empty" / "data.txt").read_text() == "a" and (tmp_path / "new" / "data.txt").read_text() == "b"


def _demo_urls_params(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["demo_corpus"].update(workers=1)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_urls_out_dot_refuses_and_deletes_nothing(tmp_path, monkeypatch, capsys):
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (checkout / "notes.md").write_text("uncommitted work")
    params = _demo_urls_params(tmp_path)
    before = _tree(checkout)
    monkeypatch.chdir(checkout)
    rc = main(["demo-urls", "--params", str(params), "--batch", "1", "--num-pairs", "5", "--out", "."])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to replace this directory" in err[0] and str(checkout) in err[0]
    assert _tree(checkout) == before
    assert sorted(p.name for p in checkout.iterdir()) == [".git", "notes.md"]


def test_demo_urls_out_url_inbox_refuses_and_keeps_the_pending_lists(tmp_path, monkeypatch, capsys):
    inbox = tmp_path / "url_inbox"
    inbox.mkdir()
    (inbox / "pending.parquet").write_bytes(b"PAR1 pending list")
    params = _demo_urls_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["demo-urls", "--params", str(params), "--num-pairs", "5", "--out", "url_inbox"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (inbox / "pending.parquet").read_bytes() == b"PAR1 pending list"


def test_demo_urls_replaces_its_own_earlier_batch(tmp_path, monkeypatch):
    params = _demo_urls_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["demo-urls", "--params", str(params), "--num-pairs", "5", "--out", "batch"]) == 0
    assert output_owner(tmp_path / "batch") == "demo_urls"
    assert main(["demo-urls", "--params", str(params), "--batch", "2", "--num-pairs", "5", "--out", "batch"]) == 0
    assert (tmp_path / "batch" / "urls.parquet").is_file()


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from clipmill.components.common.io import atomic_path
    with atomic_path(sys.argv[1], owner="reshard") as tmp:
        tmp.mkdir()
        (tmp / "part.bin").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
""")


def test_temporaries_of_a_killed_write_are_removed_when_the_next_write_starts(tmp_path):
    out = tmp_path / "curated"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
    leftovers = [p for p in tmp_path.rglob("*") if p.name == "part.bin"]
    assert leftovers and not out.exists()  # the killed write left its temporary behind, and no output
    _write_dir(out, "reshard", "rerun")
    assert (out / "data.txt").read_text() == "rerun"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated"]
    assert not [p for p in tmp_path.rglob("*") if p.name == "part.bin" or p.name.endswith(".tmp")]


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    out = tmp_path / "curated"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        _write_dir(out, "reshard", "meanwhile")
        assert [p for p in tmp_path.rglob("part.bin")]  # the running writer's temporary is still there
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)


KILLED_FILE_WRITER = textwrap.dedent("""
    import sys, time
    from clipmill.components.common.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
""")


def test_a_file_write_cut_off_is_cleaned_by_the_next_and_a_live_ones_left_alone(tmp_path):
    """A file written with no other writer under way goes straight into the temporary root it created: a killed
    one leaves its file there, which the next write removes; a running one's file stays while another writes."""
    out = tmp_path / "00000.parquet"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_FILE_WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        (pending,) = (tmp_path / ".00000.parquet.tmp").iterdir()
        assert pending.name == f"{writer.pid}.00000.parquet"
        write_parquet(pd.DataFrame({"uid": ["a"]}), out)  # meanwhile: in a directory of its own
        assert pending.is_file() and pd.read_parquet(out)["uid"].tolist() == ["a"]
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
    write_parquet(pd.DataFrame({"uid": ["b"]}), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet"]
    assert pd.read_parquet(out)["uid"].tolist() == ["b"]
    write_parquet(pd.DataFrame({"uid": ["c"]}), out)  # and the common case leaves nothing either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet"]
    long = tmp_path / ("x" * 242 + ".pq")  # <pid>.<name> would pass the 255 bytes of a name: a directory of its own
    write_parquet(pd.DataFrame({"uid": ["d"]}), long)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", long.name]


def test_a_resuming_stage_sweeps_the_temporaries_of_killed_writes_and_leaves_live_ones(tmp_path):
    """``remove_dead_writes``: what killed writers left in a folder (their files, and the temporary roots emptied
    then) goes; a running writer's temporary stays."""
    killed = subprocess.Popen([sys.executable, "-c", KILLED_FILE_WRITER, str(tmp_path / "00000.tar")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", KILLED_FILE_WRITER, str(tmp_path / "00001.tar")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "writing" and live.stdout.readline().strip() == "writing"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=10)
        (tmp_path / ".00002_stats.json.tmp").mkdir()  # a write killed between its rename and removing its root
        write_parquet(pd.DataFrame({"uid": ["a"]}), tmp_path / "00000.parquet")
        remove_dead_writes(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".00001.tar.tmp", "00000.parquet"]
        assert [p.name for p in (tmp_path / ".00001.tar.tmp").iterdir()] == [f"{live.pid}.00001.tar"]
    finally:
        live.kill()
        live.wait(timeout=10)
    remove_dead_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet"]


@pytest.mark.parametrize("stage", [["train", "--shards", "shards"], ["tune", "--shards", "shards"],
                                   ["register", "--model", "model"]])
def test_stages_writing_files_into_a_directory_refuse_anothers_before_writing(stage, tmp_path, monkeypatch, capsys):
    """train, tune and register write their files into --out one by one: pointed at another stage's output (here a
    download's) they stop with one line and leave it as it was; a file is refused the same way."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": True,
                                                                "tracking_uri": f"sqlite:///{tmp_path}/m.db"}}))
    other = tmp_path / "download"
    other.mkdir()
    for name in ("manifest.parquet", "run.json", "summary.json"):
        (other / name).write_text(name)
    assert main(["stage", *stage, "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{other}: holds files that are not part of a" in err[0] and "manifest.parquet" in err[0]
    assert {p.name: p.read_text() for p in other.iterdir()} == {n: n for n in ("manifest.parquet", "run.json",
                                                                             "summary.json")}
    assert main(["stage", *stage, "--out", "params.yaml"]) == 2
    assert "params.yaml: is a file, not a" in capsys.readouterr().err


def test_text_inputs_that_are_not_utf8_are_one_line_naming_the_file(tmp_path, capsys):
    """A params file, a metadata list or a JSON input saved in Latin-1 stops with one line, not a traceback."""
    from clipmill.components.balance.matching import read_metadata
    from clipmill.components.common.io import read_json

    params = tmp_path / "params.yaml"
    params.write_bytes("tracking: {enabled: false}\n# caf\xe9\n".encode("latin-1"))
    assert main(["stage", "download", "--params", str(params)]) == 2
    assert capsys.readouterr().err.strip() == f"clipmill: error: {params}: not UTF-8 text (byte 0xe9 at offset 32)"
    (tmp_path / "metadata.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"metadata.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_metadata(tmp_path / "metadata.txt")
    (tmp_path / "x.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(InputError, match=r"x.json: not UTF-8 text \(byte 0xff at offset 0\)"):
        read_json(tmp_path / "x.json")
