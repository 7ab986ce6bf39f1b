"""The language step: captions written, in whole or in part, in a language outside ``filter.languages``.

A web caption often mixes a description with a fragment in another language ("写真: a red circle", "a blue
star (kostenlos herunterladen)"), so the caption is cut into parts at punctuation (``: ( ) [ ] | ; , . ! ?`` and
" - ") and each part is judged on three kinds of evidence, from data shipped inside wheels (nothing is downloaded):

- py3langid's character n-gram model, which is sure of itself on longer text and on non-Latin scripts but flat
  on two-word fragments ("photo de", "foto van");
- a word model over wordfreq's frequency lists (the likeliest language of the part's words, each word drawn
  independently), which needs only a word or two (``MIN_WORD_LETTERS`` letters) that are common in one language
  and rare in the kept ones. A kept language is looked up in its large list, so that its rare words are not
  taken for foreign ones; words unknown to every list are left out;
- the script: a part written mostly in letters of a script that no kept language writes in ("壁纸" for English)
  is foreign outright.

The word and script evidence needs a wordfreq list for every kept language (otherwise py3langid decides alone).

Before any of it, HTML entities are decoded, file names and tokens with a digit (IMG_0042.jpg, 4k) are removed
and the text is lower-cased: none of these say anything about the language, and both models misread them. A part
counts as another language when either model finds that language at least ``filter.language_min_odds`` times as
likely as the likeliest kept language; short or ambiguous parts ("a blue star") stay undecided and are kept. Text
without linguistic content (py3langid's ``zxx``) counts as a kept language. The caption is dropped as
``foreign_language:<code>`` with the most confident other language.
"""
from __future__ import annotations

import html
import math
import re
import unicodedata
from collections import Counter
from functools import cache, lru_cache

import pandas as pd

from clipmill.components.common.errors import ConfigError
from clipmill.components.common.steps import Step, decisions

FOREIGN_REASON = "foreign_language"
NO_LANGUAGE = "zxx"  # py3langid's label of text without linguistic content
LANGUAGE_KEYS = ("languages", "language_min_odds")
_PARTS = re.compile(r"[:()\[\]|;,.!?]|\s-\s")
_NOT_WORDS = re.compile(r"\S*\d\S*|\S+\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]{2,}")  # single letters (a, e, y, o) are words in too many languages to tell
WORD_FLOOR = 1e-7  # below wordfreq's rarest listed word (1e-6 in the small lists): the weight of an unlisted word
_WORDFREQ_CODES = {"nb": "no", "fil": "tl"}  # wordfreq codes that py3langid spells otherwise ("sh" has none)
MIN_WORD_LETTERS = 4  # the word model's least evidence: "photo de", "zdjęcie", not "os" or "len"
SCRIPT_SHARE = 0.01  # a kept language writes in a script that carries this share of its common words' letters


# py3langid's languages (its model's labels), for checking filter.languages without loading the model (0.4 s of
# LZMA a process); tests/test_langid.py checks them against the installed model.
IDENTIFIER_LANGUAGES = frozenset("""
    ace af am an ar ary arz as az ba bcl be bg bn br bs ca crh cs cy da de dz el en eo es et eu ext fa fi fo fr
    fuv fy ga gcf gcr gd gl gom grc gu gug guw ha hbo he hi hr ht hu hy id ig is it ja jv ka kab kik kk km kn ko
    ku ky la lb lg lij ln lo lt ltg lv mg mk ml mn mr ms mt my ne nl nn no nso oc om or pa pcm pl ps pt qu ro ru
    rw sa sdh se si sk sl sn so sq sr st sv sw ta te tg th tk tl tr tt ug uk ur uz uzs vec vi vo wa wuu xh yo
    yue zh zu zxx
""".split())


@lru_cache(maxsize=1)
def identifier():
    """py3langid's model (loaded once per process), with probabilities normalised over its languages."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@cache
def frequencies(code: str, size: str) -> dict[str, float]:
    """One of wordfreq's word lists (``small`` or ``large``), loaded once per process."""
    import wordfreq

    return wordfreq.get_frequency_dict(code, size)


@lru_cache(maxsize=4)
def word_lists(kept: frozenset[str]) -> dict[str, dict[str, float]]:
    """wordfreq's word frequencies under py3langid's codes: the kept languages' large lists where one ships, the
    other languages' small ones."""
    import wordfreq

    large = wordfreq.available_languages("large")
    lists = {}
    for code in wordfreq.available_languages("small"):
        label = _WORDFREQ_CODES.get(code, code)
        if label in identifier().labels:
            lists[label] = frequencies(code, "large" if label in kept and code in large else "small")
    return lists


def script(char: str) -> str:
    """A letter's Unicode script, as the first word of its name (LATIN, CYRILLIC, CJK, HANGUL, ARABIC, ...)."""
    return unicodedata.name(char, "UNKNOWN").split()[0]


@lru_cache(maxsize=4)
def kept_scripts(kept: frozenset[str]) -> frozenset[str]:
    """The scripts the kept languages write in, from the letters of their common words (weighted by frequency);
    empty when a kept language has no word list."""
    lists = word_lists(kept)
    if not kept <= lists.keys():
        return frozenset()
    scripts: set[str] = set()
    for lang in kept:
        mass: Counter[str] = Counter()
        for word, freq in lists[lang].items():
            if freq >= 1e-6:
                mass.update({script(char): freq for char in word if char.isalpha()})
        scripts |= {name for name, weight in mass.items() if weight >= SCRIPT_SHARE * sum(mass.values())}
    return frozenset(scripts)


def caption_parts(caption: str) -> list[str]:
    """The caption's parts between punctuation, stripped, empty ones left out."""
    return [part.strip() for part in _PARTS.split(caption) if part.strip()]


def language_text(caption: str) -> str:
    """The caption as evidence of its language: entities decoded, compatibility forms folded (ＦＵＬＬ, 𝐛𝐨𝐥𝐝), file
    names and numbers out, lower case."""
    text = unicodedata.normalize("NFKC", html.unescape(caption))
    return " ".join(_NOT_WORDS.sub(" ", text).lower().split())


def char_odds(part: str, kept: frozenset[str]) -> tuple[str, float]:
    """py3langid's likeliest language of ``part`` and log10 of its odds against the likeliest kept one (or zxx)."""
    ranked = identifier().rank(part)
    top, p_top = ranked[0]
    if top in kept or top == NO_LANGUAGE:
        return top, 0.0
    p_kept = max((p for lang, p in ranked if lang in kept or lang == NO_LANGUAGE), default=0.0)
    return top, math.log10(p_top / p_kept) if p_kept > 0 else math.inf


def word_odds(part: str, kept: frozenset[str]) -> tuple[str, float]:
    """The likeliest language of ``part``'s listed words and log10 of its odds against the likeliest kept language;
    no evidence (0) without such words, when a kept language has no word list, or from fewer than
    ``MIN_WORD_LETTERS`` letters (one short word, "os", "es", "len", is common in too many languages)."""
    lists = word_lists(kept)
    words = [word for word in _WORD.findall(part) if any(word in freq for freq in lists.values())]
    if not words or not kept <= lists.keys():
        return "", 0.0
    log_p = {lang: sum(math.log10(max(freq.get(word, 0.0), WORD_FLOOR)) for word in words)
             for lang, freq in lists.items()}
    top = max(log_p, key=log_p.__getitem__)
    if sum(map(len, words)) < MIN_WORD_LETTERS:
        return top, 0.0
    return top, log_p[top] - max(log_p[lang] for lang in kept)


def script_odds(part: str, kept: frozenset[str]) -> tuple[str, float]:
    """Certain (infinite odds) when most of ``part``'s letters are in scripts no kept language writes in ("壁纸"
    for English), named by the word model if it knows the words (写真: ja, not zh), else by py3langid; no evidence
    (0) otherwise."""
    letters = [char for char in part if char.isalpha()]
    scripts = kept_scripts(kept)
    if not scripts or sum(script(char) not in scripts for char in letters) * 2 <= len(letters):
        return "", 0.0
    by_words = word_odds(part, kept)[0]
    if by_words and by_words not in kept:
        return by_words, math.inf
    return next(lang for lang, _ in identifier().rank(part) if lang not in kept and lang != NO_LANGUAGE), math.inf


def foreign_language(caption: str, languages: frozenset[str], min_odds: float) -> str | None:
    """The most confident language outside ``languages`` among the caption's parts, or None."""
    found, best = None, math.log10(min_odds)
    for part in caption_parts(language_text(caption)):
        for lang, log_odds in (script_odds(part, languages), char_odds(part, languages), word_odds(part, languages)):
            if log_odds >= best and lang not in languages:
                found, best = lang, log_odds
    return found


class LangIdStep(Step):
    """Drop captions with a part confidently in a language outside ``filter.languages`` (empty list: off)."""

    name = "langid"
    section = "filter"
    reasons = (FOREIGN_REASON,)
    needs = ("caption",)
    preload = ("py3langid.langid", "wordfreq")

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        """The language params and the versions of the two models' packages (their lists and weights)."""
        from importlib.metadata import version

        models = {package: version(package) for package in ("py3langid", "wordfreq")}
        return super().fingerprint({**{k: getattr(params, k) for k in LANGUAGE_KEYS}, "models": models},
                                   context, phase)

    @classmethod
    def check_params(cls, params, context) -> None:
        unknown = sorted(set(params.languages) - IDENTIFIER_LANGUAGES)
        if unknown:
            raise ConfigError(f"filter.languages: {unknown} not among the language identifier's codes "
                              f"(ISO 639-1, e.g. en, de, fr; {len(IDENTIFIER_LANGUAGES)} known)")

    def prepare(self) -> None:
        """Load py3langid's model, the word lists and the kept scripts (about 2 s): the step's start-up."""
        if self.params.languages:
            kept_scripts(frozenset(self.params.languages))

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
