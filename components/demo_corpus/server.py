"""The demo web server: serves the synthetic crawl's web/ directory and misbehaves the way the web does.

Each URL path in ``web/routes.json`` has a behaviour: ``ok`` (200 with the file's content type),
``not_found`` (404), ``transient_5xx`` (503 on the first request for the path, 200 afterwards),
``slow`` (answers only after ``slow_seconds``), ``truncated`` (announces the full Content-Length, sends part
of the body, closes), ``html_as_image`` (an HTML page labelled image/jpeg), ``redirect`` (302 to the real
path) and ``robots_noai`` (200 with ``X-Robots-Tag: noai``). Unknown paths are 404.

The server reads nothing outside its web/ directories: a route's ``file`` must name a file inside the route's
directory (symbolic links resolved), and a redirect ``target`` is a path on the same server (``/...``); a
routes file that breaks either is an ``InputError`` at start, and a file that has become a link out since is
answered 404.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from components.common.errors import InputError
from components.common.io import read_json
from components.common.log import get_logger

from .vocabulary import HTML_PAGE

log = get_logger("demo_server")

ROUTES_FILE = "routes.json"
ROUTES_FORMAT = 1
DEFAULT_SLOW_SECONDS = 20.0


def load_routes(web_dir: str | os.PathLike) -> dict[str, dict]:
    """URL path -> route, from ``web_dir/routes.json``."""
    path = Path(web_dir) / ROUTES_FILE
    doc = read_json(path, missing="no routes file: is this a demo_corpus web/ directory?")
    if not isinstance(doc, dict) or doc.get("format") != ROUTES_FORMAT or not isinstance(doc.get("routes"), dict):
        raise InputError(path, f"expected {{'format': {ROUTES_FORMAT}, 'routes': {{path: route}}}}", field="format")
    return doc["routes"]


def _inside(root: Path, name: object) -> Path | None:
    """``root / name`` when it resolves to a path inside ``root`` (symbolic links followed), else None."""
    if not isinstance(name, str) or not name:
        return None
    base = root.resolve()
    path = (base / name).resolve()
    return path if path.is_relative_to(base) and path != base else None


def _check_route(web_dir: Path, path: str, route: object) -> None:
    """A route reads only inside ``web_dir`` and redirects only to a path of the same server."""
    where = Path(web_dir) / ROUTES_FILE
    if not isinstance(route, dict):
        raise InputError(where, f"URL path {path!r}: a route is an object", field="routes")
    if "file" in route and _inside(Path(web_dir), route["file"]) is None:
        raise InputError(where, f"URL path {path!r}: file {str(route['file'])[:200]!r} is not a file name inside "
                                f"{web_dir}", field="routes")
    if route.get("behaviour") == "redirect":
        target = route.get("target")
        if not isinstance(target, str) or not target.startswith("/") or target.startswith("//"):
            raise InputError(where, f"URL path {path!r}: redirect target {str(target)[:200]!r} is not a path on "
                                    "this server (/...)", field="routes")


def merge_routes(web_dirs: list[Path]) -> dict[str, dict]:
    """The routes of several web/ directories (a crawl and its appended batches); each route remembers its
    directory (``root``). A URL path two directories both answer is an ``InputError``."""
    merged: dict[str, dict] = {}
    for web_dir in web_dirs:
        for path, route in load_routes(web_dir).items():
            _check_route(Path(web_dir), path, route)
            if path in merged:
                raise InputError(Path(web_dir) / ROUTES_FILE, f"URL path {path!r} is also served from "
                                                              f"{merged[path]['root']}", field="routes")
            merged[path] = {**route, "root": str(web_dir)}
    return merged


class DemoWebServer(ThreadingHTTPServer):
    """A threading HTTP server over web/ directories; per-path request counts drive transient failures."""

    def __init__(self, address: tuple[str, int], routes: dict[str, dict], slow_seconds: float):
        super().__init__(address, _Handler)
        self.routes, self.slow_seconds = routes, slow_seconds
        self.stopping = threading.Event()  # wakes stalled 'slow' handlers at shutdown
        self._requests: dict[str, int] = {}
        self._lock = threading.Lock()

    def count_request(self, path: str) -> int:
        """How many times ``path`` has been requested, this request included."""
        with self._lock:
            self._requests[path] = self._requests.get(path, 0) + 1
            return self._requests[path]

    def handle_error(self, request, client_address) -> None:
        log.debug("request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: DemoWebServer
    server_version = "clipmill-demo-web/1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's signature)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        route = self.server.routes.get(path)
        try:
            self._respond(path, route)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client left before the answer to %s", path)  # a timed-out client (slow, truncated)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              sent_bytes: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body if sent_bytes is None else body[:sent_bytes])
        self.wfile.flush()

    def _file(self, route: dict) -> bytes:
        return _inside(Path(route["root"]), route["file"]).read_bytes()

    def _respond(self, path: str, route: dict | None) -> None:
        behaviour = route["behaviour"] if route else "not_found"
        if "file" in (route or {}) and _inside(Path(route["root"]), route["file"]) is None:
            behaviour = "not_found"  # a file replaced by a link out of web/ since the server started
        if behaviour == "not_found":
            self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>\n", "text/html")
        elif behaviour == "redirect":
            self.send_response(302)
            self.send_header("Location", route["target"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif behaviour == "html_as_image":
            page = HTML_PAGE.format(title=Path(path).stem).encode()
            self._send(200, page, route["content_type"])
        elif behaviour == "transient_5xx" and self.server.count_request(path) == 1:
            self._send(503, b"<html><body><h1>503 Service Unavailable</h1></body></html>\n", "text/html",
                       {"Retry-After": "1"})
        elif behaviour == "truncated":
            body = self._file(route)
            self._send(200, body, route["content_type"], sent_bytes=len(body) // 2)
            self.close_connection = True
        elif behaviour == "slow":
            if not self.server.stopping.wait(self.server.slow_seconds):
                self._send(200, self._file(route), route["content_type"])
        elif behaviour == "robots_noai":
            self._send(200, self._file(route), route["content_type"], {"X-Robots-Tag": "noai"})
        else:  # ok, and transient_5xx after its first failure
            self._send(200, self._file(route), route["content_type"])


@contextmanager
def serve_web(web_dirs: str | os.PathLike | list, host: str = "127.0.0.1", port: int = 0,
              slow_seconds: float = DEFAULT_SLOW_SECONDS) -> Iterator[str]:
    """Serve ``web_dirs`` (a demo_corpus web/ directory, or several: the crawl's and its appended batches') in a
    daemon thread; yields the base URL.

    URLs in urls.parquet start with ``DEMO_BASE_URL``; replace that prefix with the yielded base URL.
    """
    dirs = [Path(d) for d in (web_dirs if isinstance(web_dirs, (list, tuple)) else [web_dirs])]
    web_dir = ", ".join(map(str, dirs))
    routes = merge_routes(dirs)
    server = DemoWebServer((host, port), routes, slow_seconds)
    thread = threading.Thread(target=server.serve_forever, name="demo-web-server", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    base_url = f"http://{bound_host}:{bound_port}" if ":" not in bound_host else f"http://[{bound_host}]:{bound_port}"
    log.info("serving %s (%d routes) at %s", web_dir, len(routes), base_url)
    try:
        yield base_url
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
