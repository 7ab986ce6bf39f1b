"""Zero-shot classification and retrieval metrics on L2-normalised embeddings.

Used by in-loop validation during training and by the evaluation stage, so both report the same numbers.
Ties are scored pessimistically: a target ranks behind every other candidate with an equal score, so a
collapsed model (all scores equal) gets no credit, and results do not depend on the order of candidates.
"""
from __future__ import annotations

import torch

ZEROSHOT_LOGIT_SCALE = 100.0
_CHUNK = 1024  # rows of the similarity matrix held in memory at once


def zeroshot_classifier(class_text_embeddings: torch.Tensor) -> torch.Tensor:
    """Classifier weights [D, C] from text embeddings [C, T, D] (C classes, T templates).

    Per class: normalise each template embedding, average them, renormalise.
    """
    emb = torch.nn.functional.normalize(class_text_embeddings.float(), dim=-1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1).T


def zeroshot_logits(image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Logits [N, C] = 100 * image . W."""
    return ZEROSHOT_LOGIT_SCALE * image_embeddings.float() @ classifier


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each row, how many other columns score at least as high as the target column (0 = top-1)."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores >= target_scores).sum(dim=1) - 1


def zeroshot_ranks(image_embeddings: torch.Tensor, classifier: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the rank of its true class (``target_ranks``: 0 = top-1, ties count against it) and its top-1
    class; the logits are made once, a chunk of images at a time."""
    labels = labels.long()
    ranks, top1 = [], []
    for i in range(0, len(labels), _CHUNK):
        logits = zeroshot_logits(image_embeddings[i:i + _CHUNK], classifier)
        ranks.append(target_ranks(logits, labels[i:i + _CHUNK]))
        top1.append(logits.argmax(dim=1))
    return torch.cat(ranks), torch.cat(top1)


def rank_metrics(ranks: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``acc{k}`` for each k and ``mean_per_class_recall`` (top-1 recall averaged over the classes present) from
    the true classes' ranks."""
    labels = labels.long()
    out = {f"acc{k}": (ranks < k).float().mean().item() for k in ks}
    hit = (ranks == 0).float()
    present = labels.unique()
    out["mean_per_class_recall"] = torch.stack([hit[labels == c].mean() for c in present]).mean().item()
    return out


def zeroshot_metrics(image_embeddings: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``acc{k}`` for each k and ``mean_per_class_recall`` (top-1 recall averaged over the classes present)."""
    return rank_metrics(zeroshot_ranks(image_embeddings, classifier, labels)[0], labels, ks)


def retrieval_metrics(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions; ``text_image[j]`` is the index of the image that caption j describes.

    Image to text: a hit at k when any caption of the image ranks in the top k among all captions (its other
    captions do not count against it). Text to image: a hit when its image ranks in the top k among all images.
    """
    img, txt, text_image = image_embeddings.float(), text_embeddings.float(), text_image.long()
    i2t_ranks = []
    for start in range(0, len(img), _CHUNK):
        scores = img[start:start + _CHUNK] @ txt.T
        own = text_image.view(1, -1) == torch.arange(start, start + len(scores)).view(-1, 1)
        best_own = scores.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        i2t_ranks.append(((scores >= best_own) & ~own).sum(dim=1))
    i2t = torch.cat(i2t_ranks)
    t2i = torch.cat([target_ranks(txt[s:s + _CHUNK] @ img.T, text_image[s:s + _CHUNK])
                     for s in range(0, len(txt), _CHUNK)])
    out = {f"image_to_text_recall_at_{k}": (i2t < k).float().mean().item() for k in ks}
    out.update({f"text_to_image_recall_at_{k}": (t2i < k).float().mean().item() for k in ks})
    return out


def modality_gap(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """Euclidean distance between the centroids of the image and the text embeddings."""
    return (image_embeddings.float().mean(dim=0) - text_embeddings.float().mean(dim=0)).norm().item()
