"""Curation: the declared list of steps run per download shard, resumably, on a process pool or Ray."""
