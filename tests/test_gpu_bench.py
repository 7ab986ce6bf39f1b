"""The GPU benchmark's pieces that run without a GPU: the largest-batch search, the FLOP count behind MFU, and the
whole run on tiny CPU settings (so the benchmark keeps up with the stages it measures)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from benchmarks.gpu_bench import flops_per_sample, largest_fitting, main, textured_jpeg
from clipmill.components.common.model import decode_image
from clipmill.components.common.training.params import TrainParams


@pytest.mark.parametrize("limit", [256, 300, 4095, 4096, 70_000])
def test_largest_batch_search_finds_the_limit_to_the_resolution(limit):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit

    largest, exact = largest_fitting(fits, 256, 64, cap=65536, deadline=time.perf_counter() + 60)
    if limit >= 65536:
        assert (largest, exact) == (65536, False)  # the cap stopped it: not claimed as the limit
    else:
        assert largest <= limit < largest + 64 and exact and largest % 64 == 0
    assert len(tried) <= 20


def test_flops_per_sample_count_forward_and_backward_of_both_towers():
    import random

    assert decode_image(textured_jpeg(random.Random(0), 96)).size == (96, 96)
    flops = flops_per_sample(TrainParams(model="clipmill-tiny"), torch.device("cpu"), batch=2)
    assert 1e6 < flops < 1e10


def test_the_whole_benchmark_runs_on_the_cpu_in_tiny_settings(tmp_path):
    out = tmp_path / "gpu.json"
    result = main(["--models", "clipmill-tiny", "--batch-size", "16", "--steps", "3", "--warmup", "1",
                   "--workers", "1", "--shard-images", "64", "--score-images", "32", "--source-px", "64",
                   "--device", "cpu", "--out", str(out)])
    model = result["models"]["clipmill-tiny"]
    assert model["precision"] == "32-true" and model["loader_samples_per_s"] > 0
    assert model["train"]["bare_samples_per_s"] > 0 and model["train"]["lightning_samples_per_s"] > 0
    # the step and the bare loop score the same pairs with the same model
    assert model["score"]["images"] == 32 and model["score"]["max_abs_score_difference"] < 1e-4
    assert "memory" not in model  # GPU only
    assert json.loads(out.read_text())["models"]["clipmill-tiny"]["score"] == model["score"]
