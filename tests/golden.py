"""The demo's golden lock: what a reproduction of the demo must give, output by output and file by file.

``dvc.lock`` (committed) holds the DVC hash of every output of the demo. Outputs that name or time a run (run ids,
durations, checkpoints, registry versions, Great Expectations' data docs) are labelled ``run-record`` in
``dvc.yaml``; every other output is deterministic and is compared. For a directory output, DVC's hash covers a
listing of its files; ``tests/golden_files.tsv`` keeps those listings (stage, output, file, md5), so that a
difference is reported down to the file.

Floating-point results differ between CPU kinds: MKL and oneDNN choose their kernels by processor and vector
width, and sum in other orders, so a model trained on one kind is not bit for bit the model trained on another, and
every output downstream of the first training differs. A reproduction is bit for bit the
same on one kind of CPU; ``dvc.lock`` is the golden lock of one kind, and ``tests/golden/<kind>/`` holds the lock
and listings recorded on another (``cpu.json`` says which CPU). A reproduction passes when it equals one of them.

    python -m tests.golden write                # after `make demo`: the listings of this checkout's dvc.lock
    python -m tests.golden write --kind NAME    # after `make demo` on another kind of CPU: tests/golden/NAME/
    python -m tests.golden check CLONE_DIR      # compare a reproduction (its dvc.lock and DVC cache) with the goldens
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LISTINGS = ROOT / "tests" / "golden_files.tsv"
KINDS = ROOT / "tests" / "golden"  # the golden locks of other CPU kinds, one folder each
RUN_RECORD = "run-record"


@dataclass(frozen=True)
class Output:
    stage: str
    path: str


def compared_outputs(repo_dir: Path) -> list[Output]:
    """Every output of ``repo_dir``'s dvc.yaml in stage order, except those labelled ``run-record``."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        return [Output(stage.name, out.def_path) for stage in repo.index.stages for out in stage.outs
                if RUN_RECORD not in ((out.annot.labels if out.annot else None) or [])]


def lock_hashes(lock_file: Path) -> dict[Output, str]:
    """(stage, output) -> DVC md5 (``<md5>.dir`` for a directory) from a dvc.lock."""
    doc = yaml.safe_load(lock_file.read_text()) or {}
    return {Output(name, out["path"]): out["md5"] for name, stage in (doc.get("stages") or {}).items()
            for out in stage.get("outs", [])}


def dir_listing(repo_dir: Path, md5: str) -> dict[str, str]:
    """relpath -> md5 of a directory output, from DVC's cache (``.dvc/cache/files/md5/ab/cdef….dir``)."""
    entry = repo_dir / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not entry.is_file():
        raise FileNotFoundError(f"{entry}: the listing of a directory output is not in DVC's cache")
    return {item["relpath"]: item["md5"] for item in json.loads(entry.read_text())}


def write_listings(repo_dir: Path = ROOT, out: Path = LISTINGS) -> int:
    """Write the file listings of ``repo_dir``'s compared directory outputs; returns the number of rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    hashes = lock_hashes(repo_dir / "dvc.lock")
    rows = []
    for output in compared_outputs(repo_dir):
        md5 = hashes.get(output)
        if md5 and md5.endswith(".dir"):
            rows += [(output.stage, output.path, rel, h) for rel, h in sorted(dir_listing(repo_dir, md5).items())]
    with out.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("stage", "output", "file", "md5"))
        writer.writerows(rows)
    return len(rows)


def golden_listing(output: Output, listings: Path = LISTINGS) -> dict[str, str]:
    with listings.open(newline="") as f:
        return {r["file"]: r["md5"] for r in csv.DictReader(f, delimiter="\t")
                if r["stage"] == output.stage and r["output"] == output.path}


def first_file_difference(golden: dict[str, str], fresh: dict[str, str]) -> str:
    """The first file (in path order) that differs, is missing or is new, and how many do."""
    differing = sorted(rel for rel in golden.keys() | fresh.keys() if golden.get(rel) != fresh.get(rel))
    if not differing:
        return "its files are equal but its hash is not"
    rel = differing[0]
    what = ("missing" if rel not in fresh else "new" if rel not in golden
            else f"md5 {fresh[rel][:12]}, golden {golden[rel][:12]}")
    return f"first differing file {rel} ({what}); {len(differing)} of {len(golden)} files differ"


def differences(fresh_dir: Path, golden_lock: Path, listings: Path = LISTINGS) -> list[str]:
    """One line per compared output whose hash differs from the golden lock, in stage order."""
    golden, fresh = lock_hashes(golden_lock), lock_hashes(fresh_dir / "dvc.lock")
    lines = []
    for output in compared_outputs(fresh_dir):
        want, got = golden.get(output), fresh.get(output)
        if want == got:
            continue
        where = f"stage {output.stage}: {output.path}"
        if want is None or got is None:
            lines.append(f"{where}: {'not in the golden dvc.lock' if want is None else 'not produced'}")
        elif want.endswith(".dir") and got.endswith(".dir"):
            difference = first_file_difference(golden_listing(output, listings), dir_listing(fresh_dir, got))
            lines.append(f"{where}: {difference}")
        else:
            lines.append(f"{where}: md5 {got}, golden {want}")
    return lines


def goldens() -> dict[str, tuple[Path, Path]]:
    """The recorded golden locks: kind -> (dvc.lock, listings); ``main`` is the checkout's own."""
    found = {"main": (ROOT / "dvc.lock", LISTINGS)}
    for folder in sorted(KINDS.iterdir()) if KINDS.is_dir() else []:
        if (folder / "dvc.lock").is_file():
            found[folder.name] = (folder / "dvc.lock", folder / "golden_files.tsv")
    return found


def cpu_kind() -> dict[str, str]:
    """This machine's CPU as far as it decides floating-point kernels: vendor, model and torch's vector ISA."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "model name") and key.strip() not in info:
                info[key.strip()] = value.strip()
    except OSError:
        pass
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 (a description only)
        pass
    return {"machine": platform.machine(), **info}


def check_goldens(fresh_dir: Path) -> tuple[str | None, dict[str, list[str]]]:
    """(the kind whose golden lock the reproduction equals, or None; each golden's differences)."""
    found = {kind: differences(fresh_dir, lock, listings) for kind, (lock, listings) in goldens().items()}
    return next((kind for kind, diffs in found.items() if not diffs), None), found


def clone_working_tree(dest: Path, src: Path = ROOT) -> Path:
    """A fresh clone of ``src``'s working tree (tracked and untracked, not ignored, files) as one commit in ``dest``,
    sharing ``src``'s virtual environment."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (src / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    git = ["git", "-c", "user.name=clipmill", "-c", "user.email=clipmill@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "working tree"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    (dest / ".venv").symlink_to(src / ".venv")
    return dest


def start_reproduction(src: Path = ROOT) -> tuple[subprocess.Popen, Path, Path]:
    """``dvc repro`` of the demo in a fresh clone of ``src``, in the background: (process, clone, log file)."""
    clone = clone_working_tree(Path(tempfile.mkdtemp(prefix="clipmill-golden-")) / "repo", src)
    log = clone.parent / "repro.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CLIPMILL_", "PREFECT_API"))}
    env.update(PATH=f"{src / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               NO_ALBUMENTATIONS_UPDATE="1", PREFECT_HOME=str(clone / ".prefect"))
    with log.open("w") as f:
        # niced: the reproduction fills the CPU the other tests leave idle instead of slowing them down
        proc = subprocess.Popen(["nice", "-n", "10", "dvc", "repro"], cwd=clone, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, clone, log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write tests/golden_files.tsv from this checkout's dvc.lock and DVC cache")
    write.add_argument("--kind", help="record this checkout's dvc.lock as the golden of another kind of CPU, in "
                                      "tests/golden/KIND/ (dvc.lock, golden_files.tsv, cpu.json)")
    check = sub.add_parser("check", help="compare a reproduction with the golden locks")
    check.add_argument("fresh_dir", type=Path, help="the reproduction's checkout (its dvc.lock and .dvc/cache)")
    args = parser.parse_args(argv)
    if args.command == "write":
        if args.kind:
            folder = KINDS / args.kind
            rows = write_listings(out=folder / "golden_files.tsv")
            shutil.copy2(ROOT / "dvc.lock", folder / "dvc.lock")
            (folder / "cpu.json").write_text(json.dumps(cpu_kind(), indent=2, sort_keys=True) + "\n")
            print(f"{folder.relative_to(ROOT)}: dvc.lock, cpu.json and {rows} files of directory outputs")
        else:
            print(f"{LISTINGS.relative_to(ROOT)}: {write_listings()} files of directory outputs")
        return 0
    kind, found = check_goldens(args.fresh_dir)
    if kind:
        print(f"every deterministic output equals the golden dvc.lock of kind {kind!r}")
        return 0
    for other, diffs in found.items():
        print(f"against the golden of kind {other!r}:\n" + "\n".join(diffs))
    return 1


if __name__ == "__main__":
    sys.exit(main())
