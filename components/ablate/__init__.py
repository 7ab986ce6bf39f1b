"""Ablation of the curation: train and evaluate the funnel cut after each step (and without one), side by side."""
