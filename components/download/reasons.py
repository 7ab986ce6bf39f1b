"""img2dataset's free-text error messages, normalised into a few reason categories that can be counted."""
from __future__ import annotations

import re

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")

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
    if status == "failed_to_resize":
        return _match(message, _RESIZE_PATTERNS) or "resize_error"
    http = _HTTP_STATUS.search(message)
    if http and "redirect error" not in message:
        return http_reason(int(http.group(1)))
    return _match(message, _DOWNLOAD_PATTERNS) or "download_error"
