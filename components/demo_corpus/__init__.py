"""The embedded default input: a synthetic web crawl (stage ``demo_corpus``) and the misbehaving web server
that serves it (``serve_web``, ``clipmill demo-server``)."""
from .crawl import DEMO_BASE_URL
from .ground_truth import load_ground_truth
from .server import serve_web

__all__ = ["DEMO_BASE_URL", "load_ground_truth", "serve_web"]
