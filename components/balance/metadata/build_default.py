"""Rebuild ``default.txt``, the default balancing metadata (one entry per line).

Entries: the 10,000 most frequent English words of wordfreq 3.1.1 ('en', its "best" list, built from
Wikipedia, subtitles, news, books, web text, Twitter and Reddit) that are alphabetic, two letters or longer and
not function words -- the analogue of MetaCLIP's "Wikipedia unigrams with count >= 100" -- plus color names,
shape names (singular and plural) and every color-shape bigram, so that visual concepts such as "red circle"
are entries of their own as MetaCLIP's WordNet synsets and bigrams make them. Each entry also appears
capitalized, since matching is case-sensitive and alt-text often starts with a capital.

wordfreq is needed only here, not by the pipeline: ``pip install wordfreq==3.1.1`` into any environment, then
``python components/balance/metadata/build_default.py``.
"""
from __future__ import annotations

from pathlib import Path

import wordfreq

TOP_WORDS = 10_000

FUNCTION_WORDS = set("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves also im ive dont cant wont didnt doesnt isnt
wasnt arent youre thats theres lets us oh yeah ok okay hey yes shall may might must
""".split())

COLORS = """red orange yellow green blue purple pink brown black white gray grey cyan magenta violet indigo
crimson scarlet maroon beige tan gold golden silver teal turquoise navy olive lime amber ivory ebony""".split()

SHAPES = {  # singular -> plural
    "circle": "circles", "square": "squares", "triangle": "triangles", "rectangle": "rectangles",
    "star": "stars", "hexagon": "hexagons", "pentagon": "pentagons", "octagon": "octagons", "cross": "crosses",
    "ring": "rings", "diamond": "diamonds", "heart": "hearts", "crescent": "crescents", "oval": "ovals",
    "ellipse": "ellipses", "disc": "discs", "dot": "dots", "box": "boxes", "line": "lines", "stripe": "stripes",
    "arrow": "arrows", "spiral": "spirals", "cube": "cubes", "sphere": "spheres", "cone": "cones",
    "cylinder": "cylinders", "pyramid": "pyramids", "rhombus": "rhombi", "wedge": "wedges", "moon": "moons",
}


def default_entries() -> list[str]:
    """The entries of default.txt in file order: words by frequency, then colors, shapes and bigrams."""
    words = [w for w in wordfreq.top_n_list("en", TOP_WORDS, wordlist="best")
             if w.isascii() and w.isalpha() and len(w) >= 2 and w not in FUNCTION_WORDS]
    shapes = [form for pair in SHAPES.items() for form in pair]
    bigrams = [f"{c} {s}" for c in COLORS for s in shapes]
    entries = list(dict.fromkeys(words + COLORS + shapes + bigrams))
    return list(dict.fromkeys(entries + [e[0].upper() + e[1:] for e in entries]))


if __name__ == "__main__":
    out = Path(__file__).with_name("default.txt")
    entries = default_entries()
    out.write_text("\n".join(entries) + "\n")
    print(f"{out}: {len(entries)} entries")
