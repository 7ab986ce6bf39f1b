"""A local mirror: a loopback HTTP server that answers a URL prefix from local directories (``download.mirrors``,
``clipmill demo-server``).

The download stage starts one for each mirror its URL lists use and swaps the prefix for the server's address,
so img2dataset still fetches over HTTP and every fetch rule applies; the server is the one private origin the
fetch may reach.

A mirror directory is served as is: URL path ``/a/b.jpg`` answers the file ``a/b.jpg`` (content type from its
extension), 404 when there is none. A directory may instead hold a routes file, ``routes.json``
(``{"format": 1, "routes": {url path: route}}``), that says what each URL path answers, so that a mirror can
misbehave like the web; paths it does not name are 404. A route's ``behaviour`` is one of:

- ``ok``: 200 with ``file`` (a name inside the directory) as ``content_type``;
- ``not_found``: 404;
- ``transient_5xx``: 503 (``Retry-After: 1``) on the first request for the path, then as ``ok``;
- ``slow``: as ``ok``, after the mirror's ``slow_seconds``;
- ``truncated``: announces the file's full Content-Length, sends half of it and closes the connection;
- ``html_as_image``: an HTML page labelled ``content_type``;
- ``redirect``: 302 to ``target``, a path on the same server (``/...``);
- ``robots_noai``: as ``ok``, with ``X-Robots-Tag: noai``.

The server reads nothing outside its directories: a route's ``file`` must name a file inside the route's
directory (symbolic links resolved); a routes file that breaks a rule is an ``InputError`` at start, and a file
that has become a link out since is answered 404.
"""
from __future__ import annotations

import mimetypes
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd

from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.io import read_json
from clipmill.components.common.log import get_logger

log = get_logger("mirror")

ROUTES_FILE = "routes.json"
ROUTES_FORMAT = 1
DEFAULT_SLOW_SECONDS = 20.0
FILE_BEHAVIOURS = frozenset({"ok", "transient_5xx", "slow", "truncated", "robots_noai"})  # answer a file
BEHAVIOURS = FILE_BEHAVIOURS | {"not_found", "html_as_image", "redirect"}
HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>{title}</title></head>\n"
    "<body><h1>{title}</h1><p>The image you requested is displayed on this page.</p>"
    "<img src=\"/static/logo.png\" alt=\"logo\"></body></html>\n"
)
NOT_FOUND_PAGE = b"<html><body><h1>404 Not Found</h1></body></html>\n"
UNAVAILABLE_PAGE = b"<html><body><h1>503 Service Unavailable</h1></body></html>\n"


def under_prefix(urls: pd.Series, prefix: str) -> pd.Series:
    """Which ``urls`` a mirror of ``prefix`` answers (the prefix itself followed by ``/``)."""
    return urls.str.startswith(prefix.rstrip("/") + "/", na=False)


def load_routes(directory: str | os.PathLike, missing: str = "no routes file") -> dict[str, dict]:
    """URL path -> route, from ``directory/routes.json``."""
    path = Path(directory) / ROUTES_FILE
    doc = read_json(path, missing=missing)
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


class _Names:
    """``_inside`` for the many file names of one routes file: each distinct parent folder of a name is resolved
    once, and only a name that is itself a symbolic link (read from its folder's listing) is resolved on its own.
    A routes file names one file per URL path; resolving each in full would read every folder of every path."""

    def __init__(self, root: Path):
        self.root, self.base = root, root.resolve()
        self._folders: dict[str, tuple[Path | None, frozenset[str]]] = {}

    def _folder(self, parent: str) -> tuple[Path | None, frozenset[str]]:
        """(the resolved folder when it lies inside the root or is the root, names of the links it holds)."""
        if parent not in self._folders:
            folder = (self.base / parent).resolve()
            if not folder.is_relative_to(self.base):
                folder = None
            try:
                links = frozenset(e.name for e in os.scandir(folder) if e.is_symlink()) if folder else frozenset()
            except OSError:  # not a folder (yet): none of its names is a link
                links = frozenset()
            self._folders[parent] = (folder, links)
        return self._folders[parent]

    def inside(self, name: object) -> Path | None:
        """As ``_inside(root, name)``."""
        if not isinstance(name, str) or not name:
            return None
        parent, _, leaf = name.rpartition("/")
        folder, links = self._folder(parent)
        if leaf in ("", ".", "..") or leaf in links:
            return _inside(self.root, name)
        return folder / leaf if folder is not None else None


def _route_problem(names: _Names, route: object) -> str | None:
    """Why a route is unusable (it reads outside its directory, redirects off the server, lacks a field)."""
    if not isinstance(route, dict):
        return "a route is an object"
    behaviour = route.get("behaviour")
    if behaviour not in BEHAVIOURS:
        return f"behaviour {str(behaviour)[:50]!r} is not one of {', '.join(sorted(BEHAVIOURS))}"
    if ("file" in route or behaviour in FILE_BEHAVIOURS) and names.inside(route.get("file")) is None:
        return f"file {str(route.get('file'))[:200]!r} is not a file name inside {names.root}"
    if behaviour in FILE_BEHAVIOURS | {"html_as_image"} and not isinstance(route.get("content_type"), str):
        return "a route that answers a body needs a content_type"
    target = route.get("target")
    if behaviour == "redirect" and (not isinstance(target, str) or not target.startswith("/")
                                    or target.startswith("//")):
        return f"redirect target {str(target)[:200]!r} is not a path on this server (/...)"
    return None


def merge_routes(directories: Sequence[Path]) -> dict[str, dict]:
    """The routes of the ``directories`` that have a routes file; each route remembers its directory (``root``).
    A URL path two directories both answer, or a route that breaks a rule, is an ``InputError``."""
    merged: dict[str, dict] = {}
    for directory in directories:
        if not (Path(directory) / ROUTES_FILE).is_file():
            continue
        where = Path(directory) / ROUTES_FILE
        names = _Names(Path(directory))
        for path, route in load_routes(directory).items():
            problem = _route_problem(names, route)
            if problem:
                raise InputError(where, f"URL path {path!r}: {problem}", field="routes")
            if path in merged:
                raise InputError(where, f"URL path {path!r} is also served from {merged[path]['root']}",
                                 field="routes")
            merged[path] = {**route, "root": str(directory)}
    return merged


def check_mirror(directories: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """A mirror's merged routes; a directory that does not exist or a routes file that breaks a rule is an
    ``InputError``."""
    for directory in directories:
        if not Path(directory).is_dir():
            raise InputError(directory, "mirror directory (download.mirrors) does not exist")
    return merge_routes([Path(d) for d in directories])


class MirrorServer(ThreadingHTTPServer):
    """A threading HTTP server over mirror directories; per-path request counts drive transient failures."""

    # The download's processes open a connection per URL, 16 threads each; the socketserver default of 5 waiting
    # connections drops the rest of a burst, and a client's retried connect (a second or more) can then take a fast
    # route past the download's timeout: outcomes would depend on the machine's load.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], directories: Sequence[Path], slow_seconds: float,
                 routes: dict[str, dict] | None = None):
        routes = check_mirror(directories) if routes is None else routes
        super().__init__(address, _Handler)
        self.routes, self.slow_seconds = routes, slow_seconds
        self.plain_roots = [Path(d) for d in directories if not (Path(d) / ROUTES_FILE).is_file()]
        self.stopping = threading.Event()  # wakes stalled 'slow' handlers at shutdown
        self._requests: dict[str, int] = {}
        self._lock = threading.Lock()

    def count_request(self, path: str) -> int:
        """How many times ``path`` has been requested, this request included."""
        with self._lock:
            self._requests[path] = self._requests.get(path, 0) + 1
            return self._requests[path]

    def route(self, path: str) -> dict | None:
        """What ``path`` answers: its route, else a plain file of a directory without routes, else None (404)."""
        if path in self.routes:
            return self.routes[path]
        for root in self.plain_roots:
            found = _inside(root, unquote(path).lstrip("/"))
            if found is not None and found.is_file():
                content_type = mimetypes.guess_type(found.name)[0] or "application/octet-stream"
                return {"behaviour": "ok", "file": str(found.relative_to(root.resolve())),
                        "content_type": content_type, "root": str(root)}
        return None

    def handle_error(self, request, client_address) -> None:
        log.debug("request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: MirrorServer
    server_version = "clipmill-mirror/1"

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            self._respond(path, self.server.route(path))
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

    def _respond(self, path: str, route: dict | None) -> None:
        behaviour = route["behaviour"] if route else "not_found"
        file = _inside(Path(route["root"]), route["file"]) if route and "file" in route else None
        if route and "file" in route and (file is None or not file.is_file()):
            behaviour = "not_found"  # a file gone, or replaced by a link out of the directory, since the start
        if behaviour == "not_found":
            self._send(404, NOT_FOUND_PAGE, "text/html")
        elif behaviour == "redirect":
            self.send_response(302)
            self.send_header("Location", route["target"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif behaviour == "html_as_image":
            self._send(200, HTML_PAGE.format(title=Path(path).stem).encode(), route["content_type"])
        elif behaviour == "transient_5xx" and self.server.count_request(path) == 1:
            self._send(503, UNAVAILABLE_PAGE, "text/html", {"Retry-After": "1"})
        elif behaviour == "truncated":
            body = file.read_bytes()
            self._send(200, body, route["content_type"], sent_bytes=len(body) // 2)
            self.close_connection = True
        elif behaviour == "slow":
            if not self.server.stopping.wait(self.server.slow_seconds):
                self._send(200, file.read_bytes(), route["content_type"])
        elif behaviour == "robots_noai":
            self._send(200, file.read_bytes(), route["content_type"], {"X-Robots-Tag": "noai"})
        else:  # ok, and transient_5xx after its first failure
            self._send(200, file.read_bytes(), route["content_type"])


@contextmanager
def serve_mirror(directories: Sequence[str | os.PathLike], host: str = "127.0.0.1", port: int = 0,
                 slow_seconds: float = DEFAULT_SLOW_SECONDS, routes: dict[str, dict] | None = None) -> Iterator[str]:
    """Serve ``directories`` (one mirror: a URL path is looked up in each) in a daemon thread; yields the base
    URL that replaces the mirrored prefix. ``routes``: what ``check_mirror`` returned for them, when the caller
    has checked them already."""
    dirs = [Path(d) for d in directories]
    try:
        server = MirrorServer((host, port), dirs, slow_seconds, routes)
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise ConfigError(f"cannot serve {', '.join(map(str, dirs))} at {host}:{port}: {e.strerror or e} "
                          "(choose another host or port; port 0 takes any free one)") from None
    thread = threading.Thread(target=server.serve_forever, name="mirror-server", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    base_url = f"http://{bound_host}:{bound_port}" if ":" not in bound_host else f"http://[{bound_host}]:{bound_port}"
    log.info("serving %s (%d routes) at %s", ", ".join(map(str, dirs)), len(server.routes), base_url)
    try:
        yield base_url
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
