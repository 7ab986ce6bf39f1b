"""Export a trained model as an MLflow pyfunc whose artifact is the open_clip local-dir export.

The logged model therefore carries both exports: ``mlflow.pyfunc.load_model`` (and ``mlflow models serve``)
answers embedding requests, and its ``artifacts/open_clip/`` directory loads in open_clip as
``create_model_and_transforms('local-dir:…')``. Only the JSON config and the safetensors weights are copied,
so no pickled object ever travels with a model.
"""
from __future__ import annotations

import base64
import io
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from clipmill import components
from clipmill.components.common.errors import InputError
from clipmill.components.common.model import CONFIG_FILE, WEIGHTS_FILE

from .clip_pyfunc import BATCH_SIZE, LOCAL_DIR_ARTIFACT

PYFUNC_FILE = Path(__file__).with_name("clip_pyfunc.py")
MODEL_NAME_IN_RUN = "model"
# What the pyfunc needs at serving time besides mlflow (which MLflow adds itself).
_RUNTIME_PACKAGES = ("torch", "torchvision", "open_clip_torch", "safetensors", "pillow", "numpy", "pandas")


def copy_local_dir(local_dir: str | Path, dst: Path) -> Path:
    """Copy only the config and the safetensors weights of a local-dir export into ``dst``."""
    local_dir = Path(local_dir)
    dst.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (local_dir / name).is_file():
            raise InputError(local_dir, f"not an open_clip export: {name} is missing")
        shutil.copy2(local_dir / name, dst / name)
    return dst


def _common_code(dst: Path) -> Path:
    """The ``clipmill`` package reduced to ``clipmill.components.common``: the code the pyfunc imports."""
    src = Path(components.__file__).parent
    pkg = dst / "clipmill"
    (pkg / "components").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""clipmill, as a served model needs it: the core library only."""\n')
    shutil.copy2(src / "__init__.py", pkg / "components" / "__init__.py")
    shutil.copytree(src / "common", pkg / "components" / "common",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return pkg


def signature():
    """Outputs and params only: an input schema would make MLflow drop unknown columns and coerce values before
    the model's own checks (clip_pyfunc.check_request) could name them in a 400 answer."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    outputs = Schema([ColSpec(Array(DataType.double), "image_embedding", required=False),
                      ColSpec(Array(DataType.double), "text_embedding", required=False)])
    return ModelSignature(None, outputs, ParamSchema([ParamSpec("batch_size", DataType.long, BATCH_SIZE)]))


def input_example() -> pd.DataFrame:
    """One image row (a base64 PNG, as JSON requests send it) and one text row."""
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), (200, 40, 40), dtype=np.uint8)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode(), None],
                         "text": [None, "a photo of a red square"]})


def log_clip_model(local_dir: str | Path, registered_model_name: str | None = None,
                   model_config: dict | None = None):
    """Log the local-dir export at ``local_dir`` as a pyfunc model in the active MLflow run; returns its ModelInfo.

    With ``registered_model_name`` the model also becomes a new version of that registered model.
    ``model_config``: the serving limits (clip_pyfunc.LIMITS keys) the served model enforces per request.
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="clipmill-export-") as tmp:
        tmp = Path(tmp)
        weights = copy_local_dir(local_dir, tmp / LOCAL_DIR_ARTIFACT)
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PYFUNC_FILE),
            artifacts={LOCAL_DIR_ARTIFACT: str(weights)},
            code_paths=[str(_common_code(tmp / "code"))],
            signature=signature(),
            input_example=input_example(),
            model_config=model_config,
            pip_requirements=[f"{name}=={version(name)}" for name in _RUNTIME_PACKAGES],
            registered_model_name=registered_model_name,
        )
