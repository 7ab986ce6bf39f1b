"""The spam step: captions that are web spam rather than a description of the image.

Two rules, each switchable in the ``filter:`` section: a caption longer than ``max_caption_words`` words is a
wall of page text (``caption_too_long``); a caption with ``max_spam_words`` or more words from ``spam_words``
(shop and search-engine terms: "buy", "cheap", "png", "4k", ...) is keyword stuffing (``keyword_stuffing``).
Words are compared lower-cased, without surrounding punctuation.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from clipmill.components.common.steps import Step, decisions

TOO_LONG = "caption_too_long"
STUFFING = "keyword_stuffing"
SPAM_KEYS = ("max_caption_words", "spam_words", "max_spam_words")
_WORD = re.compile(r"[\w'-]+")


class SpamStep(Step):
    name = "spam"
    section = "filter"
    reasons = (TOO_LONG, STUFFING)
    needs = ("caption",)

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        return super().fingerprint({k: getattr(params, k) for k in SPAM_KEYS}, context, phase)

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        spam_words = {w.lower() for w in self.params.spam_words}
        words = [_WORD.findall(text.lower()) for text in batch["caption"].fillna("").astype(str)]
        too_long = np.array([self.params.max_caption_words is not None and len(w) > self.params.max_caption_words
                             for w in words], dtype=bool)
        stuffed = np.array([self.params.max_spam_words is not None
                            and sum(word in spam_words for word in w) >= self.params.max_spam_words
                            for w in words], dtype=bool)
        return decisions(batch["uid"], np.where(too_long, TOO_LONG, np.where(stuffed, STUFFING, None)))
