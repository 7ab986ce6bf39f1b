"""Zero-shot and retrieval metrics against cases computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from clipmill.components.common import metrics


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_zeroshot_classifier_averages_normalised_templates_then_renormalises():
    # class 0: templates (2, 0) and (0, 1) -> normalised (1, 0), (0, 1) -> mean (.5, .5) -> (1/sqrt2, 1/sqrt2)
    text = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, -3.0], [0.0, -1.0]]])
    w = metrics.zeroshot_classifier(text)
    assert w.shape == (2, 2)
    assert torch.allclose(w[:, 0], torch.tensor([1, 1]) / math.sqrt(2))
    assert torch.allclose(w[:, 1], torch.tensor([0.0, -1.0]))
    assert torch.allclose(metrics.zeroshot_logits(unit([1, 0]), w), torch.tensor([[100 / math.sqrt(2), 0.0]]))


def test_zeroshot_accuracy_topk_and_mean_per_class_recall():
    w = torch.eye(3)  # class c is the direction e_c
    images = unit([1, .2, .1], [.1, 1, .5], [.9, 1, 0], [0, .1, 1])
    labels = torch.tensor([0, 1, 0, 2])
    # ranks of the true class: 0, 0, 1 (class 1 scores higher), 0
    out = metrics.zeroshot_metrics(images, w, labels, ks=(1, 2))
    assert out["acc1"] == pytest.approx(3 / 4)
    assert out["acc2"] == pytest.approx(1.0)
    # per class recall: class 0: 1/2, class 1: 1, class 2: 1
    assert out["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_ties_count_against_the_target():
    w = torch.eye(2)
    images = unit([1, 1], [1, 1])  # equal scores for both classes
    out = metrics.zeroshot_metrics(images, w, torch.tensor([0, 1]), ks=(1, 2))
    assert out["acc1"] == 0.0 and out["acc2"] == 1.0
    assert metrics.target_ranks(torch.tensor([[0.5, 0.5, 0.5, 0.1]]), torch.tensor([3])).item() == 3


def test_retrieval_recall_with_several_captions_per_image():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2
    texts = unit([0, 1, .1], [1, .2, 0], [0, 1, 0], [0, 0, 1], [1, 0, .5])
    text_image = torch.tensor([0, 0, 1, 2, 2])
    out = metrics.retrieval_metrics(images, texts, text_image, ks=(1, 2, 3))
    # image to text: image 0's best own caption (1, scores .98) beats every foreign one (caption 4: .89);
    # image 1's caption 2 scores 1.0 (caption 0: .995); image 2's caption 3 scores 1.0 -> all rank 0
    assert out["image_to_text_recall_at_1"] == 1.0
    # text to image, rank of the own image: caption 0 -> 2 (images 1 and 2 score higher), caption 1 -> 0,
    # caption 2 -> 0, caption 3 -> 0, caption 4 -> 1 (image 0 scores .89 > image 2 .45)
    assert out["text_to_image_recall_at_1"] == pytest.approx(3 / 5)
    assert out["text_to_image_recall_at_2"] == pytest.approx(4 / 5)
    assert out["text_to_image_recall_at_3"] == 1.0


def test_retrieval_own_captions_do_not_push_each_other_out_but_equal_foreign_ones_do():
    images = unit([1, 0], [0, 1])
    texts = unit([1, 0], [1, 0], [1, 0])  # image 0 has captions 0 and 1; caption 2 (image 1) is identical
    out = metrics.retrieval_metrics(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0: one foreign caption ties with its best -> rank 1; image 1: both captions of image 0 score
    # (1, 0).(0, 1) = 0 = its own caption's score -> rank 2
    assert out["image_to_text_recall_at_1"] == 0.0
    assert out["image_to_text_recall_at_2"] == 0.5


def test_modality_gap_is_the_distance_between_centroids():
    assert metrics.modality_gap(unit([1, 0], [0, 1]), unit([-1, 0], [0, -1])) == pytest.approx(math.sqrt(2))
    assert metrics.modality_gap(unit([1, 0]), unit([1, 0])) == pytest.approx(0.0)
