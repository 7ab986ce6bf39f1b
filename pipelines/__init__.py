"""Prefect flows that run the stages of dvc.yaml (never a second copy of their logic)."""
