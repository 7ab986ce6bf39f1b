"""Reshard: the curated training shards, written once from the download shards, shuffled, with rewrites attached."""
