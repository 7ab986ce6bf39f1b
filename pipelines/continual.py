"""What a scheduled run does around the stages: grow the crawl, fix the warm start, keep the data version.

- ``append_new_urls``: a new URL list joins the crawl as a DVC-tracked directory of ``download.additions``
  (``dvc add``), so each append is a data version of its own.
- ``write_champion_warm_start`` / ``write_scratch_warm_start``: ``warm_start.yaml`` names the current champion
  as a fixed model version (``models:/clipmill/3``), its loss, and the sha256 of its weights, exported to a
  DVC-tracked ``warm_start/<model>-v<version>/`` (so ``dvc pull`` restores them without the registry); or nothing.
- ``commit_run`` and ``push_data``: the run's ``dvc.lock``, warm start (the file and its weights' ``.dvc``) and
  crawl additions become a git commit, and its data goes to the DVC remote, so
  ``git checkout <commit> && dvc pull`` brings the run back.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.log import get_logger
from clipmill.components.train.warm_start import (
    WARM_START_DIR,
    WARM_START_FILE,
    WarmStart,
    export_weights,
    write_warm_start,
)

log = get_logger("pipeline")


def _tool(name: str) -> str:
    """An executable of the interpreter's own environment (dvc), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _run(cmd: list[str], root: Path, what: str) -> str:
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClipmillError(f"{what} failed ({' '.join(cmd[:3])} ... exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


def inbox_lists(inbox: Path) -> list[Path]:
    """URL lists waiting in an inbox directory: ``*.parquet`` in it, and ``*/urls.parquet`` (demo crawl batches,
    with their web/) one level down; in name order."""
    return sorted([p for p in inbox.glob("*.parquet")] + [p for p in inbox.glob("*/urls.parquet")])


def append_new_urls(root: Path, params, source: str | os.PathLike) -> list[str]:
    """Append the URL list ``source`` to the crawl and track it with DVC; returns the new addition ids.

    ``source`` may be an inbox directory: each list in it that the crawl does not hold yet is appended (one
    appended before is skipped), and an empty inbox appends nothing.
    """
    from clipmill.components.download.additions import AlreadyAppended, append_url_list

    source = Path(source)
    if not source.is_absolute():
        source = root / source
    lists = inbox_lists(source) if source.is_dir() else [source]
    ids = []
    for path in lists:
        try:
            # checked against the whole crawl: the base list (when it is in the work tree) and every addition
            addition = append_url_list(path, root / params.download.additions,
                                       crawl_urls=base if (base := root / params.download.urls).is_file() else None)
        except AlreadyAppended as e:
            if not source.is_dir():
                raise
            log.info("%s is in the crawl already (%s): skipped", path, e.addition_id)
            continue
        _run([_tool("dvc"), "add", "-q", str(addition.path.relative_to(root))], root, "dvc add of the new URL list")
        log.info("new URL list %s joins the crawl as %s (DVC-tracked)", path, addition.id)
        ids.append(addition.id)
    if source.is_dir() and not ids:
        log.info("no new URL list in %s", source)
    return ids


def _champion_loss(client, version) -> str | None:
    """The loss the champion was trained with: its training run's ``loss`` param."""
    run_id = version.tags.get("clipmill.train_run_id")
    if not run_id or run_id == "none":
        return None
    try:
        loss = client.get_run(run_id).data.params.get("loss")
    except Exception:  # a deleted or foreign run: the model weights still tell (see below)
        return None
    return loss if loss in ("clip", "siglip") else None


def _export_champion(root: Path, name: str, version: str, tracking: str) -> tuple[str, str]:
    """Copy the champion's weights to ``warm_start/<name>-v<version>/`` and track it with ``dvc add`` (other
    warm-start copies are dropped); returns (its path relative to ``root``, the sha256 of its weights)."""
    from clipmill.components.common.model import resolve_model_source

    rel = f"{WARM_START_DIR}/{name}-v{version}"
    with resolve_model_source(f"models:/{name}/{version}", tracking) as source:
        sha = export_weights(source, root / rel)
    _drop_warm_start_copies(root, keep=f"{rel}.dvc")
    _run([_tool("dvc"), "add", "-q", rel], root, "dvc add of the warm-start weights")
    return rel, sha


def _drop_warm_start_copies(root: Path, keep: str | None = None) -> None:
    """``dvc remove --outs`` every warm-start copy but ``keep``: the committed warm start names one at a time."""
    for tracked in sorted((root / WARM_START_DIR).glob("*.dvc")):
        rel = str(tracked.relative_to(root))
        if rel != keep:
            _run([_tool("dvc"), "remove", "--outs", rel], root, "dvc remove of an earlier warm-start copy")


def _loss_from_weights(export_dir: Path) -> str:
    from clipmill.components.common.model import read_state_dict

    return "siglip" if "logit_bias" in read_state_dict(export_dir) else "clip"


def write_champion_warm_start(root: Path, params) -> WarmStart:
    """``warm_start.yaml`` naming the champion of ``register.model_name`` as a fixed version, with its weights
    exported to a DVC-tracked local copy and their sha256 (from scratch when there is no champion yet)."""
    from mlflow import MlflowClient

    from clipmill.components.common.tracking import tracking_uri
    from clipmill.components.register.registry import CHAMPION, alias_version

    name, uri = params.register.model_name, tracking_uri(params.tracking)
    client = MlflowClient(uri)
    champion = alias_version(client, name, CHAMPION)  # a registry error stops the run: it is not "no champion"
    if champion is None:
        warm = WarmStart(reason=f"continual run: no models:/{name}@champion yet, so from scratch")
        _drop_warm_start_copies(root)
    else:
        weights, sha = _export_champion(root, name, str(champion.version), uri)
        loss = _champion_loss(client, champion) or _loss_from_weights(root / weights)
        warm = WarmStart(init_from=f"models:/{name}/{champion.version}", loss=loss, weights=weights, sha256=sha,
                         reason=f"continual run: the champion (models:/{name}@champion) when the run started")
    write_warm_start(warm, root / WARM_START_FILE)
    log.info("warm start: %s", f"{warm.init_from} (local copy {warm.weights})" if warm.init_from else warm.reason)
    return warm


def write_scratch_warm_start(root: Path) -> WarmStart:
    warm = WarmStart(reason="from scratch (clipmill run --from-scratch)")
    _drop_warm_start_copies(root)
    write_warm_start(warm, root / WARM_START_FILE)
    return warm


def _git_identity_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    configured = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True, text=True).stdout
    if not configured.strip():
        env.setdefault("GIT_AUTHOR_NAME", "clipmill")
        env.setdefault("GIT_AUTHOR_EMAIL", "clipmill@localhost")
        env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
        env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    return env


def commit_run(root: Path, params, message: str) -> str | None:
    """Commit what names this run's data: dvc.lock, warm_start.yaml and the .dvc files of the warm-start weights
    and of the crawl additions. Other changes in the work tree are left alone. Returns the commit, or None when
    nothing changed."""
    named = ("dvc.lock", WARM_START_FILE, WARM_START_DIR, params.download.additions)
    paths = [p for p in named if (root / p).exists()]
    _run(["git", "add", "--", *paths], root, "git add")
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=root)
    if staged.returncode == 0:
        log.info("nothing to commit: the run changed no data version")
        return None
    proc = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=root, capture_output=True,
                          text=True, env=_git_identity_env(root))
    if proc.returncode != 0:
        raise ClipmillError(f"git commit of the run failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    sha = _run(["git", "rev-parse", "HEAD"], root, "git rev-parse").strip()
    log.info("committed the run's data version as %s", sha[:12])
    return sha


def push_data(root: Path) -> str:
    """``dvc push`` to the default remote; returns DVC's one-line report."""
    out = _run([_tool("dvc"), "push"], root, "dvc push").strip().splitlines()
    return out[-1] if out else "pushed"
