"""Reshard: the curated training shards, written once from the download shards, shuffled, with the curation
steps' columns (rewrites, scores, matched entries) attached."""
