"""Hyperparameter sweeps: Ray Tune (ASHA) over short training runs, best config to ``data/tune/best_params.json``."""
