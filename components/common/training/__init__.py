"""The training engine shared by the train, tune, score (bootstrap) and ablation code: ``TrainParams``, the
Lightning module, the shard data, in-loop validation, and ``fit.train`` (one resumable, tracked training run).

It lives in the core library so that no stage imports another: stages and pipelines call it directly.
"""
