"""The faithfulness guard: a rewrite must keep every metadata entry its caption matched, say what the caption says
(its counts, colours and frame) and nothing the caption does not have, and say something new.

Every candidate slot of a caption ends either kept or dropped with one reason, so
captions x rewrites_per_caption = kept + dropped. The checks, in order:
- ``empty``, ``same_as_caption``, ``duplicate`` (of an earlier candidate), ``lost_entry`` (a matched entry is gone);
- ``added_url``: a URL, domain or e-mail address the caption does not have (captions are untrusted web text, and a
  model can be steered by them);
- ``count_changed`` / ``colour_changed``: the number words and digits, or the colour words, differ from the
  caption's ("two blue diamonds" is not "an orange diamond");
- ``frame_repeated``: more frames ("a photo of", "an image showing", "in a picture") than one, or than the caption
  has ("a photo of a photo of ..."); ``frame_moved``: a frame inside a list ("... and a photo of X");
- ``added_text``: more than ``max_new_words`` words that are neither the caption's (up to a plural or verb
  ending) nor function words, frame words, synonyms or template words;
- ``repeated_text``: a run of ``REPEAT_WORDS`` words said again, more often than the caption says it (a language
  model caught in a loop: "a red circle on a red circle on a red circle ...", every word the caption's).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from clipmill.components.common.text import missing_entries

from .generated import Generated
from .params import RewriteParams

EMPTY = "empty"
SAME_AS_CAPTION = "same_as_caption"
DUPLICATE = "duplicate"
LOST_ENTRY = "lost_entry"
ADDED_URL = "added_url"
COUNT_CHANGED = "count_changed"
COLOUR_CHANGED = "colour_changed"
FRAME_REPEATED = "frame_repeated"
FRAME_MOVED = "frame_moved"
ADDED_TEXT = "added_text"
REPEATED_TEXT = "repeated_text"
NOT_GENERATED = "not_generated"
REPEAT_WORDS = 4  # "to the left of a green box" and "a picture of a green cross" share three words, not four

FRAME_NOUNS = ("photo", "photograph", "picture", "image", "illustration", "drawing", "sketch", "artwork", "view",
               "close-up", "closeup", "snapshot", "shot", "poster", "painting", "render", "rendering")
FRAME = re.compile(
    r"\b(?:" + "|".join(map(re.escape, FRAME_NOUNS)) + r")s?(?: (?:of|showing|shows|depicting|depicts|featuring)\b|:)"
    r"|\bin an? (?:photo|photograph|picture|image)\b", re.IGNORECASE)
FRAME_IN_LIST = re.compile(r"\band (?:(?:a|an|the|this|one) )?(?:" + FRAME.pattern + ")", re.IGNORECASE)
URL = re.compile(r"(?i)\b(?:https?://|www\.)\S+|\b[\w.+-]+@[\w-]+\.[\w.]+|\b[\w-]+\.(?:com|net|org|io|info|biz|ru|cn"
                 r"|de|uk|co|me|ly|xyz|top|site|online|app|dev)\b")
NUMBER_WORDS = frozenset("two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                         "sixteen seventeen eighteen nineteen twenty dozen dozens pair pairs couple single".split())
COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple violet pink brown black white gray grey cyan magenta teal navy beige gold "
    "golden silver maroon turquoise indigo crimson scarlet cobalt emerald tangerine ebony ivory amber lavender olive "
    "lime azure aqua fuchsia khaki coral salmon charcoal bronze copper cream mint ruby sapphire".split())
FUNCTION_WORDS = frozenset(
    "a an the of in on at with and or to from by for as is are was were be being been its it it's this that these "
    "those there here which who whose while into onto upon along across against among around between through "
    "toward towards within without each both some several any all very also just than then so such one ones has "
    "have having can may shown showing shows seen see depicting depicts featuring features set placed sitting "
    "standing appears appear together".split())
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")


def _normalized(text: str) -> str:
    """The words of ``text``, lower-cased: rewrites that differ only in case or punctuation are the same."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _stems(word: str) -> set[str]:
    """``word`` and the forms it may take without a plural or verb ending."""
    out = {word}
    for ending in ("ing", "ed", "es", "s", "e"):
        if word.endswith(ending) and len(word) - len(ending) >= 3:
            out.add(word[: -len(ending)])
    return out


_SPELLED = dict(enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                          "fifteen sixteen seventeen eighteen nineteen twenty".split()))


def _numbers(text: str) -> Counter:
    """Number words and standalone numbers ('2' counts as 'two'; digits inside file names do not count)."""
    digits = [_SPELLED.get(int(d), d) for d in re.findall(r"\b\d+\b", text)]
    return Counter([w for w in _words(text) if w in NUMBER_WORDS] + [d for d in digits if d not in ("zero", "one")])


def _colours(text: str) -> set[str]:
    return {part for w in _words(text) for part in w.split("-") if part in COLOUR_WORDS}


@dataclass(frozen=True)
class GuardRules:
    """What a rewrite may add to its caption: the ``vocabulary`` of frame, function, synonym and template words,
    and at most ``max_new_words`` words beyond it (None: no limit)."""

    vocabulary: frozenset[str]
    max_new_words: int | None

    @classmethod
    def from_params(cls, params: RewriteParams) -> GuardRules:
        texts = [*params.templates, *params.frame_prefixes, *params.synonyms, *(w for v in params.synonyms.values()
                                                                            for w in v)]
        words = {w for text in texts for w in _words(text.replace("{d}", " "))}
        return cls(frozenset(words | FUNCTION_WORDS | set(FRAME_NOUNS)), params.max_new_words)


@lru_cache(maxsize=1)
def default_rules() -> GuardRules:
    return GuardRules.from_params(RewriteParams())


_COUNTED = NUMBER_WORDS | COLOUR_WORDS  # compared on their own, never counted as added text


@dataclass(frozen=True)
class _Caption:
    """What a rewrite of one caption is compared with (computed once per caption)."""

    urls: frozenset[str]
    numbers: Counter
    colours: frozenset[str]
    frames: int
    frames_in_list: int
    words: frozenset[str]  # the caption's words and their stems
    runs: Counter          # its runs of REPEAT_WORDS words

    @classmethod
    def of(cls, caption: str) -> _Caption:
        return cls(frozenset(URL.findall(caption)), _numbers(caption), frozenset(_colours(caption)),
                   len(FRAME.findall(caption)), len(FRAME_IN_LIST.findall(caption)),
                   frozenset(stem for w in _words(caption) for stem in _stems(w)), _runs(caption))


def _runs(text: str) -> Counter:
    words = _words(text)
    return Counter(tuple(words[i:i + REPEAT_WORDS]) for i in range(len(words) - REPEAT_WORDS + 1))


def _added_words(caption: _Caption, text: str, vocabulary: frozenset[str]) -> int:
    return sum(1 for w in _words(text) if w not in _COUNTED and w not in vocabulary
               and not _stems(w) & caption.words)


def unfaithful(caption: str | _Caption, text: str, rules: GuardRules) -> str | None:
    """The first way ``text`` says something other than ``caption`` (a drop reason), or None."""
    caption = caption if isinstance(caption, _Caption) else _Caption.of(caption)
    if set(URL.findall(text)) - caption.urls:
        return ADDED_URL
    if _numbers(text) != caption.numbers:
        return COUNT_CHANGED
    if _colours(text) != caption.colours:
        return COLOUR_CHANGED
    if len(FRAME.findall(text)) > max(1, caption.frames):
        return FRAME_REPEATED
    if len(FRAME_IN_LIST.findall(text)) > caption.frames_in_list:
        return FRAME_MOVED
    if rules.max_new_words is not None and _added_words(caption, text, rules.vocabulary) > rules.max_new_words:
        return ADDED_TEXT
    if any(n > 1 and n > caption.runs[run] for run, n in _runs(text).items()):
        return REPEATED_TEXT
    return None


def guard_rewrites(caption: str, entries: list[str], generated: Generated, slots: int,
                   rules: GuardRules | None = None) -> tuple[list[str], list[str]]:
    """One caption's candidates in; (kept rewrites, one drop reason per dropped slot) out, ``slots`` in all.

    A failed caption (``generated.error``) drops every slot with that error as the reason; slots the backend
    dropped itself (``generated.dropped``) keep their reasons; missing candidates drop as ``not_generated``;
    candidates past ``slots`` are ignored. ``rules``: what a rewrite may add (default: the default params').
    """
    if generated.error:
        return [], [generated.error] * slots
    rules = rules or default_rules()
    kept: list[str] = []
    dropped: list[str] = list(generated.dropped[:slots])
    seen = {_normalized(caption)}
    profile = _Caption.of(caption)
    candidates = generated.candidates[:slots - len(dropped)]
    for candidate in candidates:
        text = " ".join(candidate.split())
        key = _normalized(text)
        if not key:
            dropped.append(EMPTY)
        elif key == _normalized(caption):
            dropped.append(SAME_AS_CAPTION)
        elif key in seen:
            dropped.append(DUPLICATE)
        elif missing_entries(entries, text):
            dropped.append(LOST_ENTRY)
        elif (reason := unfaithful(profile, text, rules)) is not None:
            dropped.append(reason)
        else:
            kept.append(text)
        seen.add(key)
    dropped += [NOT_GENERATED] * (slots - len(kept) - len(dropped))
    return kept, dropped
