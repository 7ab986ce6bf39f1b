"""open_clip models: build, warm-start, load, export, and embed images and texts.

Training, the curation scorer and evaluation all go through this module, so it knows nothing about
training (no losses, optimizers or schedules). Exports use open_clip's ``local-dir`` layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so ``open_clip.create_model_and_transforms(
'local-dir:<dir>')`` loads them. Weights are never unpickled: safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image

from .errors import ConfigError, InputError
from .images import MAX_IMAGE_PIXELS, ImageError, decode_image  # noqa: F401 (also imported from here)
from .io import atomic_path
from .storage import LOCAL_DIR_PREFIX

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
CONFIG_FILE = "open_clip_config.json"  # the names open_clip's local-dir loader looks for
WEIGHTS_FILE = "open_clip_model.safetensors"
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
CHECKPOINT_MODULE_PREFIX = "model."  # the LightningModule keeps the open_clip model as `self.model`

ImageInput = Image.Image | bytes


open_clip.add_model_config(MODEL_CONFIG_DIR)  # the repo's configs become open_clip names ("clipmill-tiny")


@dataclass
class ClipModel:
    """An open_clip model with what it needs to run: transforms, tokenizer, and the configs to export it."""

    model: torch.nn.Module
    model_cfg: dict[str, Any]        # architecture, as written to open_clip_config.json
    preprocess_cfg: dict[str, Any]   # image preprocessing (size, mean, std, interpolation, ...)
    train_transform: Callable[[Image.Image], torch.Tensor]
    val_transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]


def architecture_config(model_name: str) -> dict[str, Any]:
    """The open_clip config of ``model_name``: a built-in name, a config in ``model_configs/``, or a JSON file."""
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise ConfigError(f"model config file {model_name} does not exist")
        open_clip.add_model_config(path)
        model_name = path.stem
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(f"unknown model '{model_name}': not an open_clip config name nor a file in "
                          f"{MODEL_CONFIG_DIR} (known: {', '.join(open_clip.list_models()[:8])}, ...)")
    return cfg


@contextmanager
def resolve_model_source(source: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """The local path of a model reference, for as long as the context is open.

    ``source`` is a ``local-dir:`` export or a plain directory holding one, a weights file (``.safetensors``, or a
    Lightning/torch checkpoint read with ``weights_only=True``), or an MLflow URI (``runs:/<id>/model``,
    ``models:/<name>@<alias>``) whose artifacts contain a local-dir export; those are downloaded to a temporary
    directory removed on exit. Other registries plug in here.
    """
    if source.startswith(MLFLOW_SCHEMES):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="clipmill-model-") as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
            except Exception as e:  # MLflow raises several types for a missing run, model or alias
                raise InputError(source, f"cannot download the model from MLflow: {e}") from None
            yield _export_dir_in(local, source)
        return
    path = Path(source[len(LOCAL_DIR_PREFIX):] if source.startswith(LOCAL_DIR_PREFIX) else source)
    if not path.exists():
        raise InputError(path, "model source does not exist")
    yield path


def _export_dir_in(root: Path, source: str) -> Path:
    """The single directory under ``root`` (itself included) that holds a local-dir export."""
    if root.is_file():
        return root
    found = sorted({p.parent for p in root.rglob(CONFIG_FILE)})
    if len(found) != 1:
        raise InputError(source, f"expected one open_clip export ({CONFIG_FILE}) in the artifacts, found {len(found)}")
    return found[0]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model weights from a local-dir export, a .safetensors file or a checkpoint (Lightning or plain)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
        if not path.is_file():
            raise InputError(path.parent, f"not an open_clip export: {WEIGHTS_FILE} is missing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safe-unpickler errors all mean the same thing here
        raise InputError(path, f"not a loadable weights-only checkpoint: {e}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "no state_dict of tensors in the checkpoint")
    if any(k.startswith(CHECKPOINT_MODULE_PREFIX) for k in state):
        state = {k[len(CHECKPOINT_MODULE_PREFIX):]: v for k, v in state.items()
                 if k.startswith(CHECKPOINT_MODULE_PREFIX)}
    return state


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load, except that a logit bias may be absent on either side (CLIP <-> SigLIP warm starts)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or k != "logit_bias"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ConfigError(f"{source}: weights do not fit the architecture (missing: {missing[:5]}, "
                          f"unexpected: {unexpected[:5]})")


def _bundle(model: torch.nn.Module, model_cfg: dict, tokenizer_name: str,
            aug_cfg: dict | None) -> ClipModel:
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    pp = open_clip.transform.PreprocessCfg(**preprocess_cfg)
    return ClipModel(
        model=model,
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        train_transform=open_clip.transform.image_transform_v2(pp, is_train=True, aug_cfg=aug_cfg),
        val_transform=open_clip.transform.image_transform_v2(pp, is_train=False),
        tokenizer=open_clip.get_tokenizer(tokenizer_name),
    )


def create_clip(model_name: str, *, init_from: str | None = None, aug_cfg: dict | None = None,
                init_logit_scale: float | None = None, init_logit_bias: float | None = None,
                tracking_uri: str | None = None) -> ClipModel:
    """A model of architecture ``model_name``, randomly initialised or warm-started from ``init_from``.

    ``init_logit_scale``/``init_logit_bias`` override the architecture's initial values; they are kept in the
    exported config so that the export loads with the same parameters.
    """
    cfg = architecture_config(model_name)
    name = Path(model_name).stem if model_name.endswith(".json") else model_name
    overrides = {k: v for k, v in (("init_logit_scale", init_logit_scale), ("init_logit_bias", init_logit_bias))
                 if v is not None}
    cfg.update(overrides)
    # pretrained_text=False: an HF text tower must not fetch weights (nothing is downloaded at run time)
    model = open_clip.create_model(name, pretrained_text=False, **overrides)
    if init_from:
        with resolve_model_source(init_from, tracking_uri) as path:
            _load_weights(model, read_state_dict(path), init_from)
    return _bundle(model, cfg, name, aug_cfg)


def load_clip(source: str, *, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> ClipModel:
    """An exported model (local-dir export, directory, or MLflow URI), in eval mode on ``device``."""
    with resolve_model_source(source, tracking_uri) as path:
        if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
            raise InputError(path, f"not an open_clip export: {CONFIG_FILE} is missing")
        config = json.loads((path / CONFIG_FILE).read_text())
        try:
            model = open_clip.create_model(f"{LOCAL_DIR_PREFIX}{path}", device=device, weights_only=True)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            raise InputError(path, f"open_clip cannot load the export: {e}") from None
        clip = _bundle(model, config["model_cfg"], f"{LOCAL_DIR_PREFIX}{path}", None)
    model.eval()
    return clip


def export_local_dir(clip: ClipModel, out_dir: str | os.PathLike) -> Path:
    """Write ``clip`` as an open_clip local-dir export (atomically: the directory appears complete or not at all)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in clip.model.state_dict().items()}
    config = {"model_cfg": clip.model_cfg, "preprocess_cfg": _jsonable(clip.preprocess_cfg)}
    with atomic_path(out_dir, owner="model") as tmp:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(out_dir)


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_image(item: ImageInput) -> Image.Image:
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    return decode_image(item)


def preprocess_images(clip: ClipModel, images: Sequence[ImageInput]) -> torch.Tensor:
    """Images (PIL or encoded bytes) as one batch of model inputs, through the validation transform."""
    return torch.stack([clip.val_transform(_as_image(im)) for im in images])


ROW_BLOCK = 16  # batches are encoded in whole blocks of this many rows


@torch.no_grad()
def _encode_batch(encode: Callable, batch: torch.Tensor) -> torch.Tensor:
    """One batch's normalised embeddings, float32 on the CPU. The batch is padded with copies of its last row to a
    whole number of ``ROW_BLOCK`` rows: matrix kernels take rows in blocks (of 4 for MKL on an AVX2 CPU) and the rows
    of a partial block, or a single row (matrix-vector kernels), are summed in another order, so a sample's
    embedding would depend on its place in its batch and on the batch's size. In whole blocks, a row's embedding
    is the same in any batch."""
    rows = len(batch)
    padding = -rows % ROW_BLOCK
    if padding:
        batch = torch.cat([batch, batch[-1:].expand(padding, *batch.shape[1:])])
    return encode(batch, normalize=True).float().cpu()[:rows]


def _embed(model: torch.nn.Module, encode: Callable, batches: Iterator[torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        device = _model_device(model)
        return torch.cat([_encode_batch(encode, b.to(device)) for b in batches])
    finally:
        model.train(was_training)


def embed_images(clip: ClipModel, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] (float32, CPU). ``images``: PIL/bytes, or preprocessed pixels."""
    def batches():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            yield chunk if isinstance(chunk, torch.Tensor) else preprocess_images(clip, chunk)

    if len(images) == 0:
        return torch.empty(0, clip.model_cfg["embed_dim"])
    return _embed(clip.model, clip.model.encode_image, batches())


def embed_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] (float32, CPU)."""
    if len(texts) == 0:
        return torch.empty(0, clip.model_cfg["embed_dim"])
    batches = (clip.tokenizer(list(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size))
    return _embed(clip.model, clip.model.encode_text, batches)
