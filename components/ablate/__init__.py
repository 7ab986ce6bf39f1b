"""Ablation of the curation: its arms, variants, statistics, report and records. The runs themselves (curate,
reshard, train and evaluate each arm) are composed in ``pipelines/ablate.py``."""
