"""img2dataset's free-text error messages, normalised into a few reason categories that can be counted.

The stage's own fetch (``fetch.py``) writes its errors as ``<reason>: <detail>`` with a reason of
``FETCH_REASONS``; messages of img2dataset's fetch (earlier runs) are matched by their wording.
"""
from __future__ import annotations

import re

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
_TAGGED = re.compile(r"([a-z0-9_]+): ")

# Reasons of the stage's fetch, each written as the message's first word.
FETCH_REASONS = frozenset({
    "private_host",         # a redirect led to (or the host came to resolve to) a non-public address
    "unsupported_scheme",   # a redirect to a scheme other than http(s)
    "invalid_url",          # a redirect to a malformed URL
    "unresolvable_host",    # the host name does not resolve
    "too_many_redirects",   # more than download.max_redirects hops, or a loop
    "robots_optout",        # X-Robots-Tag opts the URL out (for every agent or for download.user_agent_token)
    "body_too_large",       # more than download.max_body_bytes, announced or sent (after Content-Encoding)
    "unsupported_encoding",  # a Content-Encoding other than gzip, deflate (br when a decoder is installed)
    "timeout",              # no complete answer within download.timeout seconds (the whole request, redirects included)
    "truncated",            # the connection closed before the announced body (or the compressed stream) ended
    "connection_refused", "connection_reset", "tls", "download_error",
})

# (category, substrings of the error message), checked in order; the first match wins.
_DOWNLOAD_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("robots_optout", ("X-Robots-Tag",)),
    ("too_many_redirects", ("redirect error", "infinite loop")),
    ("timeout", ("timed out", "timeout")),
    ("truncated", ("IncompleteRead", "incomplete read")),
    ("hash_mismatch", ("hash mismatch",)),
    ("dns", ("Name or service not known", "nodename nor servname", "getaddrinfo failed",
             "Temporary failure in name resolution", "No address associated with hostname")),
    ("connection_refused", ("Connection refused",)),
    ("connection_reset", ("Connection reset", "Remote end closed connection", "Connection aborted", "Broken pipe")),
    ("tls", ("SSL", "CERTIFICATE", "certificate")),
    ("invalid_url", ("unknown url type", "no host given", "URL can't contain control characters")),
)
_RESIZE_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("not_an_image", ("Image decoding error",)),
    ("image_too_small", ("image too small",)),
    ("image_too_large", ("image area too large",)),
    ("bad_aspect_ratio", ("aspect ratio too large",)),
)


def _match(message: str, patterns: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for category, needles in patterns:
        if any(n in message for n in needles):
            return category
    return None


def http_reason(code: int) -> str:
    if code in (403, 404, 410, 429):
        return f"http_{code}"
    return f"http_{code // 100}xx"


def error_reason(status: str, message: str | None) -> str | None:
    """The category of a failed sample (``http_404``, ``http_5xx``, ``timeout``, ``truncated``, ``not_an_image``,
    ``robots_optout``, ...); None for successes. Refused samples carry their reason already."""
    if status == "success":
        return None
    message = message or ""
    tagged = _TAGGED.match(message)
    if status == "failed_to_download" and tagged and tagged.group(1) in FETCH_REASONS:
        return tagged.group(1)
    if status == "failed_to_resize":
        return _match(message, _RESIZE_PATTERNS) or "resize_error"
    http = _HTTP_STATUS.search(message)
    if http and "redirect error" not in message:
        return http_reason(int(http.group(1)))
    return _match(message, _DOWNLOAD_PATTERNS) or "download_error"
