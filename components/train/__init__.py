"""The train stage: ``clipmill stage train`` over a ``TrainParams`` section, with tuned values or a warm start.

The training engine itself (Lightning over open_clip on webdataset shards, resumable mid-epoch, tracked in MLflow)
is the core library's ``clipmill.components.common.training``; this stage only chooses the section and its start.
"""
