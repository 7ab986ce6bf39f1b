"""Where a training run starts: ``warm_start.yaml`` (beside params.yaml, versioned with the code).

``clipmill run <flow> --continual`` writes the current champion into it as a fixed version
(``models:/clipmill/3``) with the loss that model was trained with, and exports that version's weights to
``warm_start/<model>-v<version>/``, a DVC-tracked directory (its ``.dvc`` file committed, the weights restored by
``dvc pull``), recording their sha256. The train stage reads the weights from that local copy and refuses other
bytes, so a warm start reproduces without the registry; ``--from-scratch`` resets the file. The train stage reads
it as a DVC params file, so a changed warm start retrains, and a checkout of a past commit trains from the same
weights again. With ``init_from`` set, the ``continual:`` section replaces the schedule values of ``train:``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from clipmill.components.common.errors import InputError
from clipmill.components.common.io import load_yaml, read_text, write_text
from clipmill.components.common.log import get_logger
from clipmill.components.common.params import Section
from clipmill.components.common.training.params import TrainParams

from .params import ContinualParams

WARM_START_FILE = "warm_start.yaml"
WARM_START_DIR = "warm_start"  # the DVC-tracked local copies of warm-start weights, beside WARM_START_FILE
_HEADER = """\
# Where the train stage starts (a DVC params file of dvc.yaml's train stage).
# Written by `clipmill run <flow> --continual` (the champion, as a fixed version) or `--from-scratch`;
# init_from null: train from scratch with train:; a model: warm start with continual: over train:.
# weights: the DVC-tracked local copy of init_from's weights (`dvc pull` restores it); sha256: of its weights file.
"""

log = get_logger("train")


class WarmStart(Section):
    init_from: str | None = Field(
        None,
        description="Model to start from (models:/NAME/VERSION, runs:/, a local export); null: from scratch.",
    )
    loss: Literal["clip", "siglip"] | None = Field(
        None,
        description="The loss the warm-start model was trained with (kept, so its logit parameters fit).",
    )
    weights: str | None = Field(
        None,
        description="The DVC-tracked local copy of init_from (a local-dir export), relative to this file's directory; "
                    "null: read init_from itself.",
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the weights file of `weights`: any other bytes are refused.",
    )
    reason: str = Field("", description="Why this warm start (for people reading the file and the run summary).")


def read_warm_start(path: str | os.PathLike | None) -> WarmStart:
    """The warm start in ``path``; none (from scratch) when ``path`` is None."""
    if path is None:
        return WarmStart()
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file (write it with `clipmill run --continual` or `--from-scratch`)")
    try:
        doc = load_yaml(read_text(path)) or {}
        warm = WarmStart.model_validate(doc)
    except yaml.YAMLError as e:
        raise InputError(path, f"not valid YAML ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(path, err["msg"], field=".".join(map(str, err["loc"]))) from None
    if (warm.weights is None) != (warm.sha256 is None):
        raise InputError(path, "weights and sha256 go together (both set, or both null)", field="sha256")
    return warm


def write_warm_start(warm: WarmStart, path: str | os.PathLike) -> Path:
    return write_text(_HEADER + yaml.safe_dump(warm.model_dump(), sort_keys=False), path)


def continual_section(train: TrainParams, continual: ContinualParams, warm: WarmStart) -> TrainParams:
    """``train`` as a warm-started run trains: the warm start's model and loss, the continual schedule."""
    overrides = {**continual.model_dump(), "init_from": warm.init_from}
    if warm.loss:
        overrides["loss"] = warm.loss
    return TrainParams.model_validate({**train.model_dump(), **overrides})


def weights_sha256(export_dir: str | os.PathLike) -> str:
    """sha256 of the weights file of a local-dir export (read in full: never a cached digest)."""
    from clipmill.components.common.model import WEIGHTS_FILE

    path = Path(export_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise InputError(export_dir, f"not an open_clip export: {WEIGHTS_FILE} is missing")
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def export_weights(source_dir: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Copy the local-dir export at ``source_dir`` (config and weights only) to ``dest``; returns the sha256."""
    from clipmill.components.common.model import CONFIG_FILE, WEIGHTS_FILE

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(Path(source_dir) / name, dest / name)
    return weights_sha256(dest)


@contextmanager
def warm_start_weights(warm: WarmStart, warm_file: str | os.PathLike,
                       tracking_uri: str | None = None) -> Iterator[str | None]:
    """Where training reads the warm-start weights: the verified local copy (``local-dir:<path>``).

    None when the file names no local copy (``init_from`` is read as it is). A local copy with other bytes is
    refused. A missing one is fetched from the registry for this run only if its bytes hash the same; otherwise
    the error says to run ``dvc pull``.
    """
    if warm.init_from is None or warm.weights is None:
        yield None
        return
    local = Path(warm_file).resolve().parent / warm.weights
    if local.is_dir():
        _check_sha256(local, warm, warm_file)
        yield f"local-dir:{local}"
        return
    with _registry_copy(warm, warm_file, local, tracking_uri) as fetched:
        yield f"local-dir:{fetched}"


def _check_sha256(export_dir: Path, warm: WarmStart, warm_file: str | os.PathLike) -> None:
    from clipmill.components.common.model import WEIGHTS_FILE

    got = weights_sha256(export_dir)
    if got != warm.sha256:
        raise InputError(warm_file, f"{export_dir / WEIGHTS_FILE} has sha256 {got[:16]}..., not the "
                                    f"{str(warm.sha256)[:16]}... it names: these are not the warm-start weights "
                                    f"(restore them with `dvc checkout {warm.weights}` or `dvc pull`)",
                         field="sha256")


@contextmanager
def _registry_copy(warm: WarmStart, warm_file: str | os.PathLike, local: Path,
                   tracking_uri: str | None) -> Iterator[Path]:
    """The registry's copy of ``warm.init_from``, when its weights hash to ``warm.sha256``."""
    from clipmill.components.common.model import MLFLOW_SCHEMES, resolve_model_source

    missing = f"the warm-start weights {local} are missing: run `dvc pull` to restore them"
    if not str(warm.init_from).startswith(MLFLOW_SCHEMES):
        raise InputError(warm_file, missing, field="weights")
    with ExitStack() as stack:
        try:
            fetched = stack.enter_context(resolve_model_source(str(warm.init_from), tracking_uri))
        except InputError as e:
            raise InputError(warm_file, f"{missing} (the registry cannot provide {warm.init_from} either: {e.reason})",
                             field="weights") from None
        if weights_sha256(fetched) != warm.sha256:
            raise InputError(warm_file, f"{missing} (the registry's {warm.init_from} has other weights)",
                             field="weights")
        log.warning("%s is missing: using the registry's %s, whose weights match its sha256 (`dvc pull` restores "
                    "the local copy)", local, warm.init_from)
        yield fetched
