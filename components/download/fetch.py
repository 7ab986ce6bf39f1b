"""The download stage's HTTP fetch: what img2dataset's downloader calls for every URL.

img2dataset keeps sharding, resizing, writing and distributing; its urllib fetch is replaced by ``fetch``
(``workers.SafeDownloader``), which
- resolves the host itself, refuses a host with any non-public address (``safety.is_public_address``) and
  connects to the address it checked (Host header and TLS server name stay the URL's host), so a name that
  resolves differently a moment later (DNS rebinding) changes nothing;
- follows redirects itself, at most ``max_redirects`` hops, each hop checked again: http(s) only, public hosts only;
- bounds the whole request (connect, redirects, headers, body) by ``timeout`` seconds and the body by
  ``max_body_bytes`` (announced, sent, and after decoding ``Content-Encoding`` gzip/deflate, br when a decoder
  is installed);
- honours ``X-Robots-Tag`` for every agent and for the user agent's token (``none`` means noindex, nofollow);
- retries only answers that may change: 5xx, 408, 429, timeouts and broken connections; a 4xx, a refusal or a
  robots opt-out is final after one request.
Errors read ``<reason>: <detail>`` with a reason of ``reasons.FETCH_REASONS`` (HTTP errors keep urllib's
``HTTP Error <code>: <phrase>``), so the manifest counts them.

The only private addresses fetched are ``trusted_origins`` (address, port): the mirror servers the stage starts.
"""
from __future__ import annotations

import functools
import http.client
import io
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from .safety import INVALID_URL, PRIVATE_HOST, UNRESOLVABLE_HOST, UNSUPPORTED_SCHEME, is_public_address, resolve_host

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRIED_4XX = frozenset({408, 429})
_CHUNK = 64 * 1024
# X-Robots-Tag directives that take a value after a colon (so "name:" before them is not a user agent)
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_IMPLIED_DIRECTIVES = {"none": ("noindex", "nofollow")}

try:  # br is accepted only when a decoder is installed
    import brotli as _brotli  # type: ignore[import-not-found]
except ImportError:
    _brotli = None
ACCEPT_ENCODING = "gzip, deflate" + (", br" if _brotli is not None else "")


class FetchError(Exception):
    """A URL that gave no image: ``reason`` (see ``reasons.FETCH_REASONS``), and whether asking again may help."""

    def __init__(self, reason: str, detail: str, permanent: bool):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.permanent = reason, permanent


class HTTPStatusError(FetchError):
    def __init__(self, status: int, phrase: str):
        Exception.__init__(self, f"HTTP Error {status}: {phrase}")
        self.reason = f"http_{status}"
        self.permanent = 300 <= status < 500 and status not in RETRIED_4XX  # a 3xx here has no Location


@dataclass(frozen=True)
class FetchPolicy:
    """How one URL is fetched (built from the ``download:`` params)."""

    timeout: float = 10.0
    max_body_bytes: int = 32 * 2**20
    max_redirects: int = 5
    allow_private_hosts: bool = False
    trusted_origins: frozenset = frozenset()  # (address, port) pairs fetched although private
    user_agent_token: str | None = None
    disallowed_directives: frozenset = frozenset()
    resolver: Callable[[str, int], list[str]] = field(default=resolve_host)

    @property
    def user_agent(self) -> str:
        if not self.user_agent_token:
            return USER_AGENT
        return f"{USER_AGENT} (compatible; {self.user_agent_token}; +https://github.com/rom1504/img2dataset)"


def robots_directives(values: list[str], token: str | None) -> set[str]:
    """The X-Robots-Tag directives (lower case, ``none`` expanded) that apply to every agent or to ``token``.

    ``X-Robots-Tag: otherbot: noindex, nofollow`` addresses both directives to otherbot; a header without an
    agent name addresses everyone.
    """
    token = (token or "").strip().lower()
    found: set[str] = set()
    for value in values:
        agent = None
        for part in value.split(","):
            part = part.strip().lower()
            name, colon, rest = part.partition(":")
            if colon and name.strip() not in _VALUED_DIRECTIVES:
                agent, part = name.strip(), rest.strip()
            directive = part.split(":", 1)[0].strip()
            if directive and (agent is None or agent == token):
                found.update(_IMPLIED_DIRECTIVES.get(directive, (directive,)))
    return found


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to ``address`` for the host named in the URL."""

    raw_socket: socket.socket | None = None  # kept after http.client lets go of it, for the deadline to close
    aborted = False  # set when the deadline closed the connection

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self.raw_socket = socket.create_connection((self.address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def connect(self) -> None:
        super().connect()
        self.sock = _tls_context().wrap_socket(self.sock, server_hostname=self.host)


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # certificates checked against the URL's host name


def _check_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of a URL that may be fetched; else ``FetchError``."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise FetchError(INVALID_URL, f"{url[:200]!r} ({e})", permanent=True) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(UNSUPPORTED_SCHEME, f"{url[:200]!r}: only http and https are fetched", permanent=True)
    if not host:
        raise FetchError(INVALID_URL, f"{url[:200]!r}: no host", permanent=True)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _addresses(host: str, port: int, policy: FetchPolicy) -> list[str]:
    """The addresses to connect to, every one checked; else ``FetchError`` (private or unresolvable)."""
    try:
        addresses = policy.resolver(host, port)
    except OSError as e:
        raise FetchError(UNRESOLVABLE_HOST, f"{host}: {e}", permanent=True) from None
    if not addresses:
        raise FetchError(UNRESOLVABLE_HOST, f"{host}: no address", permanent=True)
    if policy.allow_private_hosts:
        return addresses
    private = [a for a in addresses if (a, port) not in policy.trusted_origins and not is_public_address(a)]
    if private:
        raise FetchError(PRIVATE_HOST, f"{host} resolves to {private[0]}, not a public address", permanent=True)
    return addresses


def _decoder(encoding: str | None) -> Callable[[bytes, int], bytes] | None:
    """A function (chunk, most bytes wanted) -> decoded bytes for a Content-Encoding; None for identity."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        state: dict = {}

        def inflate(chunk: bytes, limit: int) -> bytes:
            if "d" not in state:
                zlib_header = len(chunk) >= 2 and chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
                deflate_wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
                wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else deflate_wbits
                state["d"] = zlib.decompressobj(wbits)
            out = state["d"].decompress(chunk, limit + 1)
            if len(out) > limit or state["d"].unconsumed_tail:
                raise FetchError("body_too_large", f"more than the limit once decoded ({encoding})", permanent=True)
            return out
        inflate.finished = lambda: state["d"].eof if "d" in state else True  # type: ignore[attr-defined]
        return inflate
    if encoding == "br" and _brotli is not None:
        decompressor = _brotli.Decompressor()

        def unbrotli(chunk: bytes, limit: int) -> bytes:
            out = decompressor.process(chunk, output_buffer_limit=limit + 1)  # a bomb stops growing past the limit
            if len(out) > limit:
                raise FetchError("body_too_large", "more than the limit once decoded (br)", permanent=True)
            return out
        unbrotli.finished = decompressor.is_finished  # type: ignore[attr-defined]
        return unbrotli
    raise FetchError("unsupported_encoding", f"Content-Encoding {encoding!r}", permanent=True)


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The response's body, decoded, at most ``limit`` bytes; ``FetchError`` when larger or cut short."""
    declared = response.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise FetchError("body_too_large", f"Content-Length {int(declared)} > {limit} bytes", permanent=True)
    decode = _decoder(response.getheader("Content-Encoding"))
    body, received = io.BytesIO(), 0
    while chunk := response.read(_CHUNK):
        received += len(chunk)
        if received > limit:
            raise FetchError("body_too_large", f"more than {limit} bytes sent", permanent=True)
        body.write(decode(chunk, limit - body.tell()) if decode else chunk)
    if response.length:  # the connection closed before the announced Content-Length
        raise FetchError("truncated", f"IncompleteRead({received} bytes read, {response.length} more expected)",
                         permanent=False)
    if decode is not None and not decode.finished():  # type: ignore[attr-defined]
        raise FetchError("truncated", "the compressed body ends early", permanent=False)
    return body.getvalue()


def _disallowed(response: http.client.HTTPResponse, policy: FetchPolicy) -> set[str]:
    values = response.headers.get_all("X-Robots-Tag") or []
    return robots_directives(values, policy.user_agent_token) & policy.disallowed_directives if values else set()


def _request(scheme: str, host: str, port: int, target: str, addresses: list[str], deadline: float,
             policy: FetchPolicy) -> tuple[int, str, str | None, bytes | None]:
    """One GET to the first address that accepts the connection: (status, phrase, Location, body of a 2xx)."""
    connection_class = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    last_error: OSError | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn = connection_class(host, port, address, timeout=remaining)
        watchdog = threading.Timer(remaining, _abort, (conn,))  # bounds the whole request, not each read
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", target, headers={"User-Agent": policy.user_agent, "Accept": "*/*",
                                                 "Accept-Encoding": ACCEPT_ENCODING})
            response = conn.getresponse()
            if conn.aborted:
                raise _timeout(policy)
            if response.status in REDIRECT_STATUSES or not 200 <= response.status < 300:
                return response.status, response.reason, response.getheader("Location"), None
            disallowed = _disallowed(response, policy)
            if disallowed:
                raise FetchError("robots_optout", "Use of image disallowed by X-Robots-Tag directive "
                                                  f"({', '.join(sorted(disallowed))})", permanent=True)
            body = _read_body(response, policy.max_body_bytes)
            if conn.aborted:  # cut at the deadline where an end of headers or body cannot be told from a cut
                raise _timeout(policy)
            return response.status, response.reason, None, body
        except ConnectionRefusedError as e:
            last_error = e  # try the next address
        except (OSError, http.client.HTTPException, FetchError) as e:
            if conn.aborted:  # the deadline closed the connection: whatever broke, it is a timeout
                raise _timeout(policy) from None
            raise _network_error(e, deadline, policy) from None
        finally:
            watchdog.cancel()
            conn.close()
    if last_error is None:
        raise _timeout(policy)
    raise FetchError("connection_refused", f"{host}:{port}: {last_error}", permanent=False)


def _abort(conn: _PinnedHTTPConnection) -> None:
    """The deadline passed: wake any read blocked on the connection."""
    conn.aborted = True
    sock = conn.raw_socket
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _timeout(policy: FetchPolicy) -> FetchError:
    return FetchError("timeout", f"no complete answer within {policy.timeout:g} s", permanent=False)


def _network_error(error: Exception, deadline: float, policy: FetchPolicy) -> FetchError:
    if isinstance(error, FetchError):
        return error
    if isinstance(error, (socket.timeout, TimeoutError)) or time.monotonic() >= deadline:
        return _timeout(policy)
    if isinstance(error, http.client.IncompleteRead):
        return FetchError("truncated", repr(error), permanent=False)
    if isinstance(error, ssl.SSLError):
        return FetchError("tls", str(error), permanent=False)
    if isinstance(error, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return FetchError("connection_reset", str(error) or type(error).__name__, permanent=False)
    return FetchError("download_error", f"{type(error).__name__}: {error}", permanent=False)


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of ``url`` after at most ``policy.max_redirects`` redirects; ``FetchError`` otherwise."""
    deadline = time.monotonic() + policy.timeout
    seen = set()
    for _ in range(policy.max_redirects + 1):
        scheme, host, port, target = _check_url(url)
        addresses = _addresses(host, port, policy)
        status, phrase, location, body = _request(scheme, host, port, target, addresses, deadline, policy)
        if status in REDIRECT_STATUSES and location:
            seen.add(url)
            url = urljoin(url, location.strip())
            if url in seen:
                raise FetchError("too_many_redirects", f"redirect loop at {url[:200]!r}", permanent=True)
            continue
        if body is None:
            raise HTTPStatusError(status, phrase)
        return body
    raise FetchError("too_many_redirects", f"more than {policy.max_redirects} redirects", permanent=True)


def fetch_with_retry(url: str, policy: FetchPolicy, retries: int) -> tuple[bytes | None, str | None, int]:
    """(body, error message, requests sent): up to ``retries`` more attempts after an error that may change."""
    for attempt in range(retries + 1):
        try:
            return fetch(url, policy), None, attempt + 1
        except FetchError as e:
            error = e
            if e.permanent:
                break
    return None, str(error), attempt + 1

