"""clipmill pipeline stages: one package per stage, shared code in ``clipmill.components.common``."""
import os

# Nothing is fetched at run time: no update checks, no model hubs.
for _var in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE"):
    os.environ.setdefault(_var, "offline" if _var == "WANDB_MODE" else "1")
