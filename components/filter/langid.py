"""The language step: captions written, in whole or in part, in a language outside ``filter.languages``.

A web caption often mixes a description with a fragment in another language ("写真: a red circle", "a blue
star (kostenlos herunterladen)"), so the caption is cut into parts at punctuation (``: ( ) [ ] | ; , . ! ?`` and
" - ") and each part is identified with py3langid's offline model (shipped inside its wheel, nothing is
downloaded). A part counts as another language when that language is at least ``filter.language_min_odds``
times as likely as the likeliest kept language; the model's probabilities flatten with shorter text, so short
or ambiguous parts ("a blue star") stay undecided and are kept. Text without linguistic content (file names,
numbers: the model's ``zxx``) counts as a kept language. The caption is dropped as ``foreign_language:<code>``
with the most confident other language.
"""
from __future__ import annotations

import re
from functools import lru_cache

import pandas as pd

from clipmill.components.common.errors import ConfigError
from clipmill.components.common.steps import Step, decisions

FOREIGN_REASON = "foreign_language"
NO_LANGUAGE = "zxx"  # py3langid's label of text without linguistic content
LANGUAGE_KEYS = ("languages", "language_min_odds")
_PARTS = re.compile(r"[:()\[\]|;,.!?]|\s-\s")


@lru_cache(maxsize=1)
def identifier():
    """py3langid's model (loaded once per process), with probabilities normalised over its languages."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def caption_parts(caption: str) -> list[str]:
    """The caption's parts between punctuation, stripped, empty ones left out."""
    return [part.strip() for part in _PARTS.split(caption) if part.strip()]


def foreign_language(caption: str, languages: frozenset[str], min_odds: float) -> str | None:
    """The most confident language outside ``languages`` among the caption's parts, or None."""
    found, best_odds = None, min_odds
    for part in caption_parts(caption):
        ranked = identifier().rank(part)
        top, p_top = ranked[0]
        if top in languages or top == NO_LANGUAGE:
            continue
        p_kept = max((p for lang, p in ranked if lang in languages or lang == NO_LANGUAGE), default=0.0)
        odds = p_top / p_kept if p_kept > 0 else float("inf")
        if odds >= best_odds:
            found, best_odds = top, odds
    return found


class LangIdStep(Step):
    """Drop captions with a part confidently in a language outside ``filter.languages`` (empty list: off)."""

    name = "langid"
    section = "filter"
    reasons = (FOREIGN_REASON,)
    needs = ("caption",)

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        return super().fingerprint({k: getattr(params, k) for k in LANGUAGE_KEYS}, context, phase)

    @classmethod
    def check_params(cls, params, context) -> None:
        unknown = sorted(set(params.languages) - set(identifier().labels))
        if unknown:
            raise ConfigError(f"filter.languages: {unknown} not among the language identifier's codes "
                              f"(ISO 639-1, e.g. en, de, fr; {len(identifier().labels)} known)")

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        if not self.params.languages:
            return decisions(batch["uid"], [None] * len(batch))
        languages = frozenset(self.params.languages)
        found = [foreign_language(text, languages, self.params.language_min_odds)
                 for text in batch["caption"].fillna("").astype(str)]
        return decisions(batch["uid"], [f"{FOREIGN_REASON}:{lang}" if lang else None for lang in found])

    @classmethod
    def expectations(cls, params, table: pd.DataFrame, step_dir: str) -> list:
        """Every language drop names a language the identifier knows and that is not a kept one."""
        import great_expectations as gx

        dropped = table.loc[~table["keep"].astype(bool), ["uid", "reason"]]
        named = [str(reason).partition(":")[2] for reason in dropped["reason"]]
        frame = pd.DataFrame({"uid": dropped["uid"].to_numpy(), "language": pd.Series(named, dtype=object)})
        foreign = sorted(set(identifier().labels) - set(params.languages) - {NO_LANGUAGE})
        return [("foreign_languages", frame, [
            gx.expectations.ExpectColumnValuesToBeInSet(column="language", value_set=foreign),
        ])]
