"""The words of the synthetic crawl: concept names, their synonyms, and the web's noise.

A concept is "<color> <shape>" in plain English ("red circle"), so text matching finds it; synonyms
("crimson disc") and noise make the captions look like alt-text from the web.
"""
from __future__ import annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 140, 20),
    "yellow": (250, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (250, 130, 190),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "hexagon", "cross", "ring", "diamond", "heart", "crescent",
)

CONCEPTS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)

COLOR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("tangerine", "amber"),
    "yellow": ("golden", "lemon"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "cobalt", "navy"),
    "purple": ("violet", "plum"),
    "pink": ("rose", "salmon"),
    "brown": ("chocolate", "chestnut"),
    "black": ("ebony", "jet"),
    "white": ("ivory", "snow"),
}

# (singular, plural) of each shape's name and synonyms
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("dot", "dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("tile", "tiles")),
    "triangle": (("triangle", "triangles"), ("wedge", "wedges")),
    "star": (("star", "stars"), ("pentagram", "pentagrams")),
    "hexagon": (("hexagon", "hexagons"), ("hex", "hexes")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "ring": (("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombi"), ("lozenge", "lozenges")),
    "heart": (("heart", "hearts"), ("love heart", "love hearts")),
    "crescent": (("crescent", "crescents"), ("moon", "moons")),
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# grid cell (column, row) of a 3x3 layout -> how captions say where an object is
POSITIONS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the top left"),
    (1, 0): ("at the top", "near the top edge"),
    (2, 0): ("in the top right corner", "at the top right"),
    (0, 1): ("on the left", "at the left side"),
    (1, 1): ("in the center", "in the middle"),
    (2, 1): ("on the right", "at the right side"),
    (0, 2): ("in the bottom left corner", "at the bottom left"),
    (1, 2): ("at the bottom", "near the bottom edge"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}

BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("plain", "solid", "simple"),
    "gradient": ("gradient", "smooth gradient", "fading"),
    "texture": ("textured", "noisy", "grainy"),
    "transparent": ("transparent",),
}

# {d}: the scene description; {bg}: a background word
FRAMES: tuple[str, ...] = (
    "{d}", "{d}", "{d}", "a photo of {d}", "an image of {d}", "picture of {d}", "{d} on a {bg} background",
    "illustration of {d}", "{d}, vector illustration", "simple geometric art with {d}", "abstract {d} wallpaper",
    "cute {d} clipart", "{d} isolated on a {bg} background", "drawing: {d}", "{d} - flat design icon",
    "close-up of {d}", "a poster showing {d}", "minimalist {d}", "{d} pattern", "my kid drew {d}",
)

# clean templates for held-out captions and trusted pairs (no noise; held-out names always canonical)
CLEAN_FRAMES: tuple[str, ...] = (
    "{d}", "a photo of {d}", "an image of {d}", "{d} on a {bg} background", "a picture showing {d}",
    "a drawing of {d}", "an illustration of {d}",
)

ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a drawing of a {}.", "an illustration of a {}.", "a picture of a {}.",
    "a {} on a plain background.", "a simple {} shape.",
)

FILENAME_PATTERNS: tuple[str, ...] = (
    "IMG_{n:04d}.jpg", "DSC{n:05d}.JPG", "image_{n}.png", "photo-{n}.jpeg", "Screenshot_{n:06d}.png",
    "P{n:07d}.JPG", "download ({k}).jpg", "file{n}.webp",
)

BOILERPLATE: tuple[str, ...] = (
    "click to enlarge", "stock photo", "free download", "royalty free", "HD wallpaper",
    "click image to view full size", "image via Pinterest", "all rights reserved", "see more",
    "high resolution", "download now", "thumbnail", "view larger image",
)

# captions that are nothing but boilerplate (none names a concept)
BOILERPLATE_ONLY: tuple[str, ...] = BOILERPLATE + (
    "untitled", "image", "photo", "no description available", "Picture 1", "untitled-1.png", "Home",
    "logo", "banner", "img", "placeholder", "Figure 3",
)

SEO_WORDS: tuple[str, ...] = (
    "best", "cheap", "free", "hd", "4k", "wallpaper", "download", "top", "2024", "buy", "online", "deals",
    "shapes", "art", "design", "ideas", "printable", "clipart", "png", "vector", "aesthetic", "trending",
)

FOREIGN_FRAGMENTS: tuple[str, ...] = (
    "photo de", "imagen de", "Bild von", "immagine di", "foto van", "zdjęcie", "фото", "写真", "그림", "صورة",
    "kostenlos herunterladen", "télécharger gratuitement", "descarga gratis",
)

LONG_FILLER: tuple[str, ...] = (
    "This beautiful image is part of our collection of high quality pictures that you can use for your "
    "projects.",
    "Our gallery is updated every day with new designs, so make sure you bookmark this page and come back soon.",
    "Feel free to share it with your friends and family on social media if you like it.",
    "All images are the property of their respective owners and are shown here for information only.",
    "Browse more pictures in the same category using the links below this post.",
)
