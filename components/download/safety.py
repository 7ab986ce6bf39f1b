"""Which URLs the downloader refuses to fetch, and why.

A crawl is untrusted input: a URL naming a loopback, private, link-local, reserved or cloud-metadata address
(169.254.169.254, fd00:ec2::254, 100.100.100.200, ...) would make the downloader probe the machine it runs
on or its network. Such URLs are refused unless ``allow_private_hosts`` is set, and so are schemes other
than http(s) (urllib would read ``file://`` URLs from the local disk).
"""
from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable
from urllib.parse import urlsplit

from tqdm import tqdm

from components.common.log import progress_disabled

PRIVATE_HOST = "private_host"
UNSUPPORTED_SCHEME = "unsupported_scheme"
INVALID_URL = "invalid_url"

_RESOLVER_THREADS = 32


def is_public_address(address: str) -> bool:
    """True when ``address`` (an IP literal) is routable on the public internet."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_is_private(host: str) -> bool:
    """True when ``host`` is, or resolves to, any non-public address. Unresolvable hosts are not private:
    their download fails later with a DNS error, which is recorded."""
    try:
        return not is_public_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return False
    return any(not is_public_address(info[4][0]) for info in infos)


def _split(url: object) -> tuple[str | None, str | None]:
    """(refusal reason, hostname) of a URL before any DNS lookup."""
    if not isinstance(url, str) or not url.strip():
        return INVALID_URL, None
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return INVALID_URL, None
    if not parts.scheme:
        return INVALID_URL, None
    if parts.scheme.lower() not in ("http", "https"):
        return UNSUPPORTED_SCHEME, None
    if not host:
        return INVALID_URL, None
    return None, host


def refusal_reasons(urls: Iterable[object], allow_private_hosts: bool) -> list[str | None]:
    """For each URL, the reason it is refused (``invalid_url``, ``unsupported_scheme``, ``private_host``) or None."""
    split = [_split(u) for u in urls]
    if allow_private_hosts:
        return [reason for reason, _ in split]
    hosts = sorted({host for reason, host in split if reason is None})
    with ThreadPoolExecutor(_RESOLVER_THREADS) as pool:
        private = dict(zip(hosts, tqdm(pool.map(host_is_private, hosts), total=len(hosts), desc="resolve hosts",
                                       unit="host", disable=progress_disabled())))
    return [reason or (PRIVATE_HOST if private[host] else None) for reason, host in split]
