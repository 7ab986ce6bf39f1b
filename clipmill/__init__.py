"""clipmill: a raw web crawl of (image URL, alt-text) pairs in, a registered CLIP-style model out."""
__version__ = "0.1.0"
