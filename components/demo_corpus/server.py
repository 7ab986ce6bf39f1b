"""The demo web server: the synthetic crawl's web/ directories served by the mirror server
(``clipmill.components.common.mirror``), misbehaving per URL path as ``web/routes.json`` says (404, transient 503,
slow, truncated, HTML labelled as an image, redirect, ``X-Robots-Tag: noai``). ``clipmill demo-server`` runs it
on its own; the download stage serves the same directories through ``download.mirrors``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clipmill.components.common.mirror import DEFAULT_SLOW_SECONDS, ROUTES_FILE, load_routes, serve_mirror

__all__ = ["DEFAULT_SLOW_SECONDS", "ROUTES_FILE", "load_routes", "serve_web"]


@contextmanager
def serve_web(web_dirs: str | os.PathLike | list, host: str = "127.0.0.1", port: int = 0,
              slow_seconds: float = DEFAULT_SLOW_SECONDS) -> Iterator[str]:
    """Serve ``web_dirs`` (a demo_corpus web/ directory, or several: the crawl's and its appended batches') in a
    daemon thread; yields the base URL. Each directory must hold a routes file.

    URLs in urls.parquet start with ``DEMO_BASE_URL``; replace that prefix with the yielded base URL.
    """
    dirs = [Path(d) for d in (web_dirs if isinstance(web_dirs, (list, tuple)) else [web_dirs])]
    for web_dir in dirs:
        load_routes(web_dir, missing="no routes file: is this a demo_corpus web/ directory?")
    with serve_mirror(dirs, host, port, slow_seconds) as base_url:
        yield base_url
