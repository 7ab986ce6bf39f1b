"""Training: Lightning over open_clip on webdataset shards (DDP, resumable mid-epoch, tracked in MLflow).

``components.train.train.train`` is the stage's public entry point; the tune stage runs its trials through it.
"""
