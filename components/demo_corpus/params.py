"""params.yaml sections ``demo_corpus`` (the synthetic crawl) and ``demo_server`` (the misbehaving web server)."""
from __future__ import annotations

from pydantic import Field, model_validator

from clipmill.components.common.params import Section


class _RatesSummingToAtMostOne(Section):
    """Mutually exclusive categories: their rates may not add up to more than 1."""

    @model_validator(mode="after")
    def _sum_at_most_one(self):
        total = sum(getattr(self, name) for name in type(self).model_fields)
        if total > 1.0 + 1e-9:
            raise ValueError(f"the rates add up to {total:.3f}, more than 1")
        return self


class BehaviourRates(_RatesSummingToAtMostOne):
    """How each crawl URL misbehaves on the demo server; the rest answer 200 (``ok``)."""

    not_found: float = Field(0.04, ge=0, le=1, description="404 Not Found.")
    transient_5xx: float = Field(0.03, ge=0, le=1, description="503 on the first request, 200 on a retry.")
    slow: float = Field(0.01, ge=0, le=1, description="Answers only after the server's slow_seconds "
                        "(demo_server.slow_seconds, download.mirrors[].slow_seconds): a timeout.")
    truncated: float = Field(0.02, ge=0, le=1, description="Announces the full Content-Length, sends part, closes.")
    html_as_image: float = Field(0.02, ge=0, le=1, description="An HTML page served as image/jpeg.")
    redirect: float = Field(0.05, ge=0, le=1, description="302 to the image's real path, then 200.")
    robots_noai: float = Field(0.02, ge=0, le=1, description="200 with the header 'X-Robots-Tag: noai'.")


class CaptionDefectRates(_RatesSummingToAtMostOne):
    mismatched: float = Field(0.12, ge=0, le=1, description="Caption of another image (no concept in common).")
    boilerplate_only: float = Field(0.05, ge=0, le=1,
                                   description="Caption is only boilerplate ('click to enlarge', 'IMG_0042.jpg').")


class ImageDefectRates(_RatesSummingToAtMostOne):
    exact_duplicate: float = Field(0.04, ge=0, le=1, description="Same image bytes as another pair, other URL.")
    near_duplicate: float = Field(0.04, ge=0, le=1,
                                 description="Another pair's scene re-encoded, shifted by a few pixels or rescaled.")


class CaptionNoiseRates(Section):
    """Independent web noise added to honest captions (a caption can get several)."""

    synonym: float = Field(0.3, ge=0, le=1,
                           description="Per word: a synonym instead of the concept's name ('crimson').")
    filename: float = Field(0.08, ge=0, le=1, description="A camera file name around the caption ('IMG_0042.jpg').")
    boilerplate: float = Field(0.15, ge=0, le=1, description="Boilerplate appended ('click to enlarge').")
    seo_spam: float = Field(0.04, ge=0, le=1, description="A run of SEO keywords appended.")
    foreign: float = Field(0.05, ge=0, le=1, description="A fragment in another language.")
    html_entities: float = Field(0.05, ge=0, le=1, description="HTML entities left in (&amp; &quot;).")
    very_long: float = Field(0.01, ge=0, le=1, description="A caption of several hundred characters.")
    empty: float = Field(0.02, ge=0, le=1, description="An empty caption.")


class ImageKindRates(Section):
    """Image file formats (relative weights) and pixel modes (fractions of the crawl's images)."""

    jpeg: float = Field(0.6, ge=0, description="Relative weight of JPEG files.")
    png: float = Field(0.25, ge=0, description="Relative weight of PNG files.")
    webp: float = Field(0.15, ge=0, description="Relative weight of WebP files.")
    grayscale: float = Field(0.05, ge=0, le=1, description="Grayscale images (their captions name no colors).")
    palette: float = Field(0.02, ge=0, le=1, description="Palette (mode P) PNGs.")
    alpha: float = Field(0.02, ge=0, le=1, description="Transparent background (RGBA PNG/WebP).")
    exif_rotated: float = Field(0.05, ge=0, le=1,
                                description="Fraction of JPEGs stored rotated, with an EXIF tag that undoes it.")
    oversized: float = Field(0.005, ge=0, le=1, description="Images of oversized_px instead of the small native size.")

    @model_validator(mode="after")
    def _some_format_and_modes_exclusive(self):
        if self.jpeg + self.png + self.webp <= 0:
            raise ValueError("at least one of jpeg, png, webp needs a positive weight")
        if self.grayscale + self.palette + self.alpha > 1.0 + 1e-9:
            raise ValueError("grayscale, palette and alpha add up to more than 1")
        return self


class DemoCorpusParams(Section):
    seed_offset: int = Field(0, ge=0, description="Added to project.seed; a different offset gives another crawl.")
    num_pairs: int = Field(12000, ge=1, description="Crawl size: (URL, caption) pairs in urls.parquet.")
    num_sites: int = Field(200, ge=1, description="Distinct web sites the URLs are spread over.")
    min_px: int = Field(96, ge=32, description="Smallest native image side, in pixels.")
    max_px: int = Field(256, ge=32, description="Largest native image side, in pixels.")
    oversized_px: int = Field(1500, ge=256, description="Long side of the oversized images, in pixels.")
    max_objects: int = Field(3, ge=1, le=9, description="Objects per scene: 1 to this many.")
    zipf_exponent: float = Field(1.1, gt=0, description="Concept popularity ~ 1/rank^exponent (long tail).")
    behaviours: BehaviourRates = Field(default_factory=BehaviourRates,
                                       description="Fractions of URLs per server behaviour (they add up to at most 1).")
    caption_defects: CaptionDefectRates = Field(default_factory=CaptionDefectRates,
                                                description="Fractions of pairs with a defective caption (exclusive).")
    image_defects: ImageDefectRates = Field(default_factory=ImageDefectRates,
                                            description="Fractions of pairs whose image duplicates another "
                                                        "(exclusive).")
    caption_noise: CaptionNoiseRates = Field(default_factory=CaptionNoiseRates, description="Web noise in captions.")
    images: ImageKindRates = Field(default_factory=ImageKindRates, description="Image formats and modes.")
    zeroshot_per_class: int = Field(20, ge=1, description="Held-out zero-shot images per class (one class per concept, "
                                                          "100 classes): per-class recall moves in steps of 1/20.")
    retrieval_size: int = Field(500, ge=1, description="Held-out retrieval images.")
    retrieval_captions: int = Field(5, ge=1, description="Clean captions per retrieval image.")
    trusted_size: int = Field(2500, ge=1, description="Clean trusted seed pairs (for the bootstrap filtering network).")
    trusted_synonym: float | None = Field(
        None, ge=0, le=1,
        description="Per word: a synonym instead of the concept's name in the trusted captions (null: "
                    "caption_noise.synonym), so the bootstrap scorer learns the words the crawl uses.")
    trusted_grayscale: float | None = Field(
        None, ge=0, le=1,
        description="Grayscale trusted images, their captions naming no colors (null: images.grayscale), "
                    "so the bootstrap scorer has seen the crawl's grayscale pairs.")
    trusted_shard_size: int = Field(1000, ge=1, description="Samples per trusted webdataset shard.")
    workers: int = Field(
        2, ge=1,
        description="Rendering processes (1 renders in-process); the output does not depend on it.",
    )

    @model_validator(mode="after")
    def _px_range(self):
        if self.min_px > self.max_px:
            raise ValueError(f"min_px ({self.min_px}) is larger than max_px ({self.max_px})")
        return self


class DemoServerParams(Section):
    slow_seconds: float = Field(
        20.0, gt=0,
        description="How long 'slow' URLs of `clipmill demo-server` stall before answering; keep it above "
                    "download.timeout so they time out (the download stage's mirror: download.mirrors[].slow_seconds).")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "demo_corpus": (DemoCorpusParams,
        'The synthetic web crawl, the embedded default input -> <data_dir>/crawl, <data_dir>/eval, '
        '<data_dir>/trusted.'),
    "demo_server": (DemoServerParams, "`clipmill demo-server`: the demo crawl's misbehaving web server."),
}
