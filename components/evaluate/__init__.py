"""Evaluation stage: zero-shot classification, image-text retrieval and modality gap on the versioned eval suite."""
