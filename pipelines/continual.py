"""What a scheduled run does around the stages: grow the crawl, fix the warm start, keep the data version.

- ``append_new_urls``: a new URL list joins the crawl as a DVC-tracked directory of ``download.additions``
  (``dvc add``), so each append is a data version of its own.
- ``write_champion_warm_start`` / ``write_scratch_warm_start``: ``warm_start.yaml`` names the current champion
  as a fixed model version (``models:/clipmill/3``) and its loss, or nothing.
- ``commit_run`` and ``push_data``: the run's ``dvc.lock``, warm start and crawl additions become a git commit,
  and its data goes to the DVC remote, so ``git checkout <commit> && dvc pull`` brings the run back.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from components.common.errors import ClipmillError
from components.common.log import get_logger
from components.train.warm_start import WARM_START_FILE, WarmStart, write_warm_start

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
    from components.download.additions import AlreadyAppended, append_url_list

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


def _loss_from_weights(uri: str, tracking_uri: str) -> str:
    from components.common.model import read_state_dict, resolve_model_source

    with resolve_model_source(uri, tracking_uri) as path:
        return "siglip" if "logit_bias" in read_state_dict(path) else "clip"


def write_champion_warm_start(root: Path, params) -> WarmStart:
    """``warm_start.yaml`` naming the champion of ``register.model_name`` as a fixed version (from scratch when
    there is no champion yet)."""
    from mlflow import MlflowClient

    from components.common.tracking import tracking_uri
    from components.register.registry import CHAMPION, alias_version

    name, uri = params.register.model_name, tracking_uri(params.tracking)
    client = MlflowClient(uri)
    champion = alias_version(client, name, CHAMPION)  # a registry error stops the run: it is not "no champion"
    if champion is None:
        warm = WarmStart(reason=f"continual run: no models:/{name}@champion yet, so from scratch")
    else:
        model_uri = f"models:/{name}/{champion.version}"
        loss = _champion_loss(client, champion) or _loss_from_weights(model_uri, uri)
        warm = WarmStart(init_from=model_uri, loss=loss,
                         reason=f"continual run: the champion (models:/{name}@champion) when the run started")
    write_warm_start(warm, root / WARM_START_FILE)
    log.info("warm start: %s", warm.init_from or warm.reason)
    return warm


def write_scratch_warm_start(root: Path) -> WarmStart:
    warm = WarmStart(reason="from scratch (clipmill run --from-scratch)")
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
    """Commit what names this run's data: dvc.lock, warm_start.yaml and the crawl additions (their .dvc files).
    Other changes in the work tree are left alone. Returns the commit, or None when nothing changed."""
    paths = [p for p in ("dvc.lock", WARM_START_FILE, params.download.additions) if (root / p).exists()]
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
