"""Which URLs the downloader refuses to fetch, and why.

A crawl is untrusted input: a URL naming a loopback, private, link-local, reserved or cloud-metadata address
(169.254.169.254, fd00:ec2::254, 100.100.100.200, ...) would make the downloader probe the machine it runs
on or its network. Such URLs are refused unless ``allow_private_hosts`` is set, and so are schemes other
than http(s) (urllib would read ``file://`` URLs from the local disk). IPv6 forms that carry an IPv4 address
(IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4
``2002::/16``) count as the IPv4 address they lead to; Teredo tunnels are refused. A host that does not resolve is
refused (``unresolvable_host``).

This is the check of the listed URL, before anything is fetched; the fetch (``fetch.py``) checks again every
address it connects to, redirects included, and connects to the address it checked.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from tqdm import tqdm

from clipmill.components.common.log import progress_disabled

PRIVATE_HOST = "private_host"
UNSUPPORTED_SCHEME = "unsupported_scheme"
INVALID_URL = "invalid_url"
UNRESOLVABLE_HOST = "unresolvable_host"

_RESOLVER_THREADS = 32


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4), else None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0:  # ::a.b.c.d (IPv4-compatible, deprecated), and :: / ::1 themselves
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def is_public_address(address: str) -> bool:
    """True when ``address`` (an IP literal) is routable on the public internet, and so is any IPv4 address it
    embeds."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:  # a tunnel whose far end cannot be checked
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return _public_v4(embedded)
    return ip.is_global and not ip.is_multicast


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not ip.is_multicast


def resolve_host(host: str, port: int | None = None) -> list[str]:
    """The addresses ``host`` resolves to (an IP literal is itself); raises ``OSError`` when it does not resolve."""
    try:
        return [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as e:
        raise OSError(f"not a valid host name ({e})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def host_refusal(host: str) -> str | None:
    """``private_host`` when ``host`` is, or resolves to, any non-public address; ``unresolvable_host`` when it
    does not resolve; None when every address it resolves to is public."""
    try:
        addresses = resolve_host(host)
    except OSError:
        return UNRESOLVABLE_HOST
    return PRIVATE_HOST if any(not is_public_address(a) for a in addresses) else None


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
    """For each URL, the reason it is refused (``invalid_url``, ``unsupported_scheme``, ``private_host``,
    ``unresolvable_host``) or None."""
    split = [_split(u) for u in urls]
    if allow_private_hosts:
        return [reason for reason, _ in split]
    hosts = sorted({host for reason, host in split if reason is None})
    with ThreadPoolExecutor(_RESOLVER_THREADS) as pool:
        refused = dict(zip(hosts, tqdm(pool.map(host_refusal, hosts), total=len(hosts), desc="resolve hosts",
                                       unit="host", disable=progress_disabled())))
    return [reason or refused[host] for reason, host in split]
