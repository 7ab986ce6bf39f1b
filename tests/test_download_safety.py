"""The download stage's fetch on loopback: a "public" server (127.0.0.2, trusted as the demo server is) and a
"private" one (127.0.0.1), host names from a resolver stub; redirects, rebinding, caps, retries, robots."""
from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import brotli
import pytest

from clipmill.components.download.fetch import FetchError, FetchPolicy, fetch, fetch_with_retry, robots_directives
from clipmill.components.download.reasons import error_reason
from clipmill.components.download.safety import is_public_address, refusal_reasons

PUBLIC_IP, PRIVATE_IP = "127.0.0.2", "127.0.0.1"
BODY = b"\x89PNG fake image bytes " * 50


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.hits[self.path] += 1
        route = self.server.routes.get(self.path)
        if route is None:
            self._answer(404, b"not found")
        else:
            route(self)

    def _answer(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)


class Site(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address):
        super().__init__(address, _Handler)
        self.routes, self.hits = {}, Counter()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.server_address[0]}:{self.port}{path}"


@contextmanager
def _serving(address):
    site = Site(address)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.shutdown()
        site.server_close()


@pytest.fixture(scope="module")
def sites():
    """A public and a private site on the same port number (so a rebound name would reach the private one)."""
    for _ in range(20):
        with _serving((PUBLIC_IP, 0)) as public:
            try:
                private_cm = _serving((PRIVATE_IP, public.port))
                private = private_cm.__enter__()
            except OSError:
                continue
            try:
                private.routes["/secret"] = lambda h: h._answer(200, b"metadata credentials")
                yield public, private
            finally:
                private_cm.__exit__(None, None, None)
            return
    pytest.skip("no port free on both loopback addresses")


@pytest.fixture(autouse=True)
def _fresh(sites):
    for site in sites:
        site.hits.clear()
    yield
    sites[0].routes.clear()


class StubResolver:
    """Host name -> successive answers (the last repeats); counts lookups. Unknown names do not resolve."""

    def __init__(self, answers: dict[str, list[list[str]]]):
        self.answers, self.lookups = answers, Counter()

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups[host] += 1
        if host not in self.answers:
            try:
                return [str(__import__("ipaddress").ip_address(host))]
            except ValueError:
                raise OSError(f"[Errno -2] Name or service not known: {host}") from None
        seq = self.answers[host]
        return seq[min(self.lookups[host], len(seq)) - 1]


def _policy(public, resolver=None, **kw) -> FetchPolicy:
    base = dict(timeout=3.0, max_body_bytes=64 * 1024, max_redirects=3,
                trusted_origins=frozenset({(PUBLIC_IP, public.port)}), user_agent_token="clipmill",
                disallowed_directives=frozenset({"noai", "noimageai", "noindex", "noimageindex"}),
                resolver=resolver or StubResolver({"public.test": [[PUBLIC_IP]], "private.test": [[PRIVATE_IP]]}))
    return FetchPolicy(**{**base, **kw})


def _reason(public, path, **kw) -> str:
    with pytest.raises(FetchError) as err:
        fetch(public.url(path), _policy(public, **kw))
    assert error_reason("failed_to_download", str(err.value)) == err.value.reason
    return err.value.reason


def _redirect(location: str):
    return lambda h: h._answer(302, b"", {"Location": location})


def test_redirect_to_a_private_host_is_refused_at_that_hop(sites):
    public, private = sites
    public.routes["/ok"] = lambda h: h._answer(200, BODY)
    public.routes["/to-private-name"] = _redirect(private.url("/secret", host="private.test"))
    public.routes["/to-private-ip"] = _redirect(private.url("/secret"))
    public.routes["/to-mapped"] = _redirect(f"http://[::ffff:127.0.0.1]:{private.port}/secret")
    public.routes["/chain"] = _redirect("/to-private-name")
    public.routes["/to-public"] = _redirect(public.url("/ok", host="public.test"))
    assert fetch(public.url("/to-public"), _policy(public)) == BODY
    for path in ("/to-private-name", "/to-private-ip", "/to-mapped", "/chain"):
        assert _reason(public, path) == "private_host", path
    assert private.hits["/secret"] == 0
    # allow_private_hosts lifts the check, redirects included
    assert fetch(public.url("/to-private-name"), _policy(public, allow_private_hosts=True)) == b"metadata credentials"


def test_dns_rebinding_reaches_only_the_address_that_was_checked(sites):
    public, private = sites
    public.routes["/img"] = lambda h: h._answer(200, BODY)
    private.routes["/img"] = lambda h: h._answer(200, b"private answer")
    resolver = StubResolver({"rebind.test": [[PUBLIC_IP], [PRIVATE_IP]]})  # public when checked, private after
    assert fetch(f"http://rebind.test:{public.port}/img", _policy(public, resolver)) == BODY
    assert resolver.lookups["rebind.test"] == 1 and private.hits["/img"] == 0 and public.hits["/img"] == 1
    # the next request resolves afresh, sees the private address and is refused before connecting
    with pytest.raises(FetchError, match="private_host: rebind.test resolves to 127.0.0.1"):
        fetch(f"http://rebind.test:{public.port}/img", _policy(public, resolver))
    assert private.hits["/img"] == 0


def test_a_name_resolving_to_one_private_address_among_public_ones_is_refused(sites):
    public, _ = sites
    resolver = StubResolver({"mixed.test": [["93.184.216.34", PRIVATE_IP]]})
    with pytest.raises(FetchError, match="private_host"):
        fetch(f"http://mixed.test:{public.port}/img", _policy(public, resolver))


@pytest.mark.parametrize("host", ["[::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[::ffff:127.0.0.1]",
                                  "[::ffff:7f00:1]", "[64:ff9b:1::a9fe:a9fe]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
                                  "127.1", "2130706433", "0x7f000001", "[::1]", "0.0.0.0"])
def test_ipv4_embedded_and_odd_loopback_forms_are_refused(host, sites):
    public, private = sites
    url = f"http://{host}:{private.port}/secret"
    with pytest.raises(FetchError) as err:
        fetch(url, _policy(public, resolver=lambda h, p: __import__("clipmill.components.download.safety",
                                                                         fromlist=["x"]).resolve_host(h, p)))
    assert err.value.reason == "private_host"
    assert refusal_reasons([url], allow_private_hosts=False) == ["private_host"]
    assert private.hits["/secret"] == 0


def test_public_addresses_embedded_in_ipv6_stay_public():
    assert is_public_address("64:ff9b::5db8:d822") and is_public_address("2002:5db8:d822::1")
    assert not is_public_address("::ffff:169.254.169.254") and not is_public_address("64:ff9b::a9fe:a9fe")


def test_unresolvable_hosts_and_non_http_redirects_are_refused_with_their_reason(sites):
    public, _ = sites
    public.routes["/to-file"] = _redirect("file:///etc/passwd")
    public.routes["/to-ftp"] = _redirect("ftp://public.test/x.jpg")
    public.routes["/to-nowhere"] = _redirect("http://nowhere.test/x.jpg")
    public.routes["/loop"] = _redirect("/loop2")
    public.routes["/loop2"] = _redirect("/loop")
    for n in range(5):
        public.routes[f"/hop{n}"] = _redirect(f"/hop{n + 1}")
    public.routes["/hop5"] = lambda h: h._answer(200, BODY)
    assert _reason(public, "/to-file") == "unsupported_scheme"
    assert _reason(public, "/to-ftp") == "unsupported_scheme"
    assert _reason(public, "/to-nowhere") == "unresolvable_host"
    assert _reason(public, "/loop") == "too_many_redirects"
    assert _reason(public, "/hop0") == "too_many_redirects"  # 5 hops > max_redirects 3
    assert fetch(public.url("/hop2"), _policy(public)) == BODY  # 3 hops


@pytest.mark.parametrize("status, requests", [(404, 1), (410, 1), (403, 1), (400, 1), (503, 3), (500, 3),
                                              (429, 3), (408, 3)])
def test_permanent_answers_are_requested_once_and_transient_ones_retried(sites, status, requests):
    public, _ = sites
    public.routes["/x"] = lambda h: h._answer(status, b"no")
    body, error, sent = fetch_with_retry(public.url("/x"), _policy(public), retries=2)
    assert body is None and error.startswith(f"HTTP Error {status}")
    assert sent == public.hits["/x"] == requests


@pytest.mark.parametrize("header, disallowed", [
    (["none"], True), (["noindex"], True), (["NoIndex, nofollow"], True), (["noai"], True),
    (["clipmill: none"], True), (["clipmill: noindex"], True), (["otherbot: noindex"], False),
    (["otherbot: noindex, nofollow", "clipmill: noimageindex"], True), (["otherbot: none, clipmill: all"], False),
    (["noarchive, nosnippet"], False), (["unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
    (["all"], False), (["max-image-preview: large, noai"], True),
])
def test_x_robots_tag_none_and_noindex_for_all_agents_and_for_our_token(sites, header, disallowed):
    public, _ = sites

    def answer(h):
        h.send_response(200)
        for value in header:
            h.send_header("X-Robots-Tag", value)
        h.send_header("Content-Length", str(len(BODY)))
        h.end_headers()
        h.wfile.write(BODY)
    public.routes["/r"] = answer
    body, error, sent = fetch_with_retry(public.url("/r"), _policy(public), retries=2)
    assert (error is not None and error.startswith("robots_optout")) == disallowed, (header, error)
    assert sent == 1 and (body == BODY) != disallowed
    assert robots_directives(["none"], "x") == {"noindex", "nofollow"}


def test_content_encodings_are_decoded_and_bounded(sites):
    public, _ = sites
    raw_deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = raw_deflate.compress(BODY) + raw_deflate.flush()
    public.routes["/gzip"] = lambda h: h._answer(200, gzip.compress(BODY), {"Content-Encoding": "gzip"})
    public.routes["/deflate"] = lambda h: h._answer(200, zlib.compress(BODY), {"Content-Encoding": "deflate"})
    public.routes["/raw-deflate"] = lambda h: h._answer(200, raw, {"Content-Encoding": "deflate"})
    public.routes["/gzip-bomb"] = lambda h: h._answer(200, gzip.compress(bytes(10 * 2**20)),
                                                      {"Content-Encoding": "gzip"})
    public.routes["/cut-gzip"] = lambda h: h._answer(200, gzip.compress(BODY)[:-12], {"Content-Encoding": "gzip"})
    public.routes["/br"] = lambda h: h._answer(200, brotli.compress(BODY), {"Content-Encoding": "br"})
    br_bomb = brotli.compress(bytes(64 * 2**20), quality=4)
    public.routes["/br-bomb"] = lambda h: h._answer(200, br_bomb, {"Content-Encoding": "br"})
    public.routes["/zstd"] = lambda h: h._answer(200, BODY, {"Content-Encoding": "zstd"})
    public.routes["/big"] = lambda h: h._answer(200, bytes(100 * 1024))
    public.routes["/big-unannounced"] = _unannounced(bytes(100 * 1024))
    for path in ("/gzip", "/deflate", "/raw-deflate", "/br"):
        assert fetch(public.url(path), _policy(public)) == BODY, path
    assert _reason(public, "/gzip-bomb") == "body_too_large"
    assert _reason(public, "/br-bomb") == "body_too_large"  # 64 MiB of zeros in a few hundred bytes
    assert _reason(public, "/cut-gzip") == "truncated"
    assert _reason(public, "/zstd") == "unsupported_encoding"
    assert _reason(public, "/big") == "body_too_large"
    assert _reason(public, "/big-unannounced") == "body_too_large"


def _unannounced(body: bytes):
    def answer(h):
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
        h.close_connection = True
    return answer


def _trickle(body: bytes, delay: float, headers_too: bool = False):
    def answer(h):
        if headers_too:
            for byte in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"a" * 40:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(delay)
            h.wfile.write(b"\r\n\r\n" + body)
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
            time.sleep(delay)
    return lambda h: _quietly(answer, h)


def _quietly(answer, h):
    try:
        answer(h)
    except (BrokenPipeError, ConnectionResetError):
        pass


@pytest.mark.parametrize("headers_too", [False, True])
def test_a_trickling_answer_times_out_on_the_total_not_per_read(sites, headers_too):
    public, _ = sites
    public.routes["/slow"] = _trickle(BODY[:60], delay=0.05, headers_too=headers_too)  # 3 s in all, 20 bytes/s
    started = time.monotonic()
    body, error, sent = fetch_with_retry(public.url("/slow"), _policy(public, timeout=1.0), retries=0)
    assert body is None and error.startswith("timeout") and sent == 1
    assert time.monotonic() - started < 1.8


def test_a_body_shorter_than_announced_is_truncated_and_retried(sites):
    public, _ = sites
    public.routes["/cut"] = lambda h: (h._answer(200, BODY[:100], length=len(BODY)),
                                       setattr(h, "close_connection", True))
    body, error, sent = fetch_with_retry(public.url("/cut"), _policy(public), retries=1)
    assert body is None and error.startswith("truncated: IncompleteRead(100 bytes read") and sent == 2


def test_private_origin_is_fetched_only_when_trusted(sites):
    public, private = sites
    with pytest.raises(FetchError, match="private_host"):
        fetch(private.url("/secret"), _policy(public))
    trusted = _policy(public, trusted_origins=frozenset({(PRIVATE_IP, private.port)}))
    assert fetch(private.url("/secret"), trusted) == b"metadata credentials"
    with pytest.raises(FetchError, match="private_host"):  # the same address on another port is not trusted
        fetch(f"http://{PRIVATE_IP}:{_free_port()}/secret", trusted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((PRIVATE_IP, 0))
        return s.getsockname()[1]


def test_img2dataset_workers_fetch_and_decode_through_the_guards(sites, tmp_path):
    """The real img2dataset run (spawned worker) with the stage's fetch and decode: every case lands in the
    shard with its reason, a permanent failure costs one request, the private site is never reached."""
    import tarfile

    import cv2
    import numpy as np
    import pandas as pd

    from clipmill.components.download.params import DownloadParams
    from clipmill.components.download.shards import read_shard
    from clipmill.components.download.stage import fetch_policy, run_img2dataset

    from .test_download_decode import _bilevel_png, _gradient

    public, private = sites
    png = cv2.imencode(".png", _gradient(40, 40, 3, 255))[1].tobytes()
    grey16 = cv2.imencode(".png", _gradient(40, 40, 1, 65535)[..., 0])[1].tobytes()
    bomb = _bilevel_png(12000, 12000)
    public.routes.update({
        "/ok.png": lambda h: h._answer(200, png),
        "/grey16.png": lambda h: h._answer(200, grey16),
        "/bomb.png": lambda h: h._answer(200, bomb),
        "/gzip.png": lambda h: h._answer(200, gzip.compress(png), {"Content-Encoding": "gzip"}),
        "/gone": lambda h: h._answer(410, b"gone"),
        "/none": lambda h: h._answer(200, png, {"X-Robots-Tag": "none"}),
        "/to-private": _redirect(private.url("/secret")),
        "/to-file": _redirect("file:///etc/passwd"),
    })
    expected = {"ok": None, "grey16": None, "gzip": None, "bomb": "image_too_large", "gone": "http_410",
                "none": "robots_optout", "to-private": "private_host", "to-file": "unsupported_scheme"}
    paths = {"ok": "/ok.png", "grey16": "/grey16.png", "gzip": "/gzip.png", "bomb": "/bomb.png"}
    table = pd.DataFrame({"uid": list(expected), "url": [public.url(paths.get(u, f"/{u}")) for u in expected],
                          "caption": [f"caption {u}" for u in expected]})
    table.to_parquet(tmp_path / "urls.parquet")
    params = DownloadParams(processes_count=1, thread_count=4, number_sample_per_shard=100, image_size=32,
                            timeout=5, retries=2)
    run_img2dataset(tmp_path / "urls.parquet", tmp_path / "shards", params, ["uid"],
                    fetch_policy(params, frozenset({(PUBLIC_IP, public.port)})))
    rows = read_shard(tmp_path / "shards", 0)
    got = {r.uid: error_reason(r.status, r.error_message) for r in rows.itertuples()}
    assert got == expected
    assert public.hits["/gone"] == public.hits["/none"] == public.hits["/to-private"] == 1
    assert private.hits["/secret"] == 0
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tar:
        key = rows.set_index("uid").loc["grey16", "key"]
        jpg = tar.extractfile(f"{key}.jpg").read()
    grey = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert 60 < grey.mean() < 200  # saturated to 255 before


def _self_signed(tmp_path, name: str):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_connects_to_the_checked_address_with_the_host_name_for_sni_and_certificate(tmp_path, monkeypatch):
    import ssl

    from clipmill.components.download import fetch as fetch_module

    cert, key = _self_signed(tmp_path, "public.test")
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    names = []
    server_side.sni_callback = lambda sock, name, ctx: names.append(name)
    with _serving((PUBLIC_IP, 0)) as site:
        site.socket = server_side.wrap_socket(site.socket, server_side=True)
        site.routes["/img"] = lambda h: h._answer(200, BODY, {"X-Host": h.headers["Host"]})
        url = f"https://public.test:{site.port}/img"
        policy = _policy(site, StubResolver({"public.test": [[PUBLIC_IP]]}),
                         trusted_origins=frozenset({(PUBLIC_IP, site.port)}))
        with pytest.raises(FetchError, match="^tls: "):  # a certificate the system does not trust
            fetch(url, policy)
        client_side = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(fetch_module, "_tls_context", lambda: client_side)
        assert fetch(url, policy) == BODY
        assert names[-1] == "public.test" and site.hits["/img"] == 1
