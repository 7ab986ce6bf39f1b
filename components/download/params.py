"""The ``download:`` section of params.yaml."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from clipmill.components.common.params import Section

# Left out of a run's fingerprint: the URL list counts by its content, not its path, and the rest change how
# fast the download runs but not what it produces; a rerun that changes only these resumes the previous run.
# A mirror changes where URLs are fetched from, not which: like the list's path, it is left out too.
NOT_FINGERPRINTED = frozenset({"urls", "additions", "processes_count", "thread_count", "distributor", "mirrors"})


class MirrorParams(Section):
    """URLs under ``prefix`` answered from the local directory ``dir`` (``components/common/mirror.py``)."""

    prefix: str = Field(description="URL prefix, scheme://host[:port][/path] (http or https): a URL mirrored "
                                    "is this prefix followed by '/'.")
    dir: str = Field(description="Local directory served for the prefix: its files, or what its routes.json "
                                 "says each URL path answers. An appended URL list's web/ directory joins it.")
    slow_seconds: float = Field(20.0, gt=0, description="How long routes marked 'slow' stall before answering; "
                                                        "keep it above timeout so they time out.")

    @field_validator("prefix")
    @classmethod
    def _http_prefix(cls, prefix: str) -> str:
        parts = urlsplit(prefix)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"{prefix!r} is not an http(s)://host[/path] prefix")
        return prefix.rstrip("/")


class DownloadParams(Section):
    urls: str = Field(
        "data/crawl/urls.parquet",
        description="URL list (parquet: url, caption, optional uid, passthrough columns).",
    )
    additions: str = Field(
        "data/crawl_additions", description="Directory of URL lists appended to the crawl by "
                                            "`clipmill run full --new-urls` (one DVC-tracked directory per list), "
                                            "fetched after urls.")
    image_size: int = Field(
        64, ge=8, le=4096,
        description="Target image size in pixels (meaning depends on resize_mode).",
    )
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "center_crop", description="img2dataset resize mode: no, border, keep_ratio, keep_ratio_largest, center_crop.")
    resize_only_if_bigger: bool = Field(False, description="Only downscale; smaller images keep their size.")
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the re-encoded images.")
    number_sample_per_shard: int = Field(
        1000, ge=1,
        description="URLs per shard (one tar + parquet + stats file each).",
    )
    processes_count: int = Field(
        16, ge=1, description="Download processes (multiprocessing distributor), at most one per shard left. More "
        "than the cores pays: a shard ends with its slowest URL (a timeout, retried), and while one process waits on "
        "that tail the others use the CPU; where shards outnumber processes, the first ones start apart so that their "
        "tails do not fall together (on 2 cores, the demo's 12 shards: 6 processes 49-50 s, 12 38-39 s; 48 shards: 6 "
        "192-204 s, 16 141 s, 103-106 s with cheaper resizes, 93-102 s also started apart; 192 shards: 6 643-661 s, "
        "16 374-409 s, 289-332 s started apart with cheaper resizes; the same outcomes and shards). Each costs about "
        "120 MB beside the server the workers fork from. More than the sites can answer in time changes "
        "outcomes: a URL answered after the timeout fails.")
    thread_count: int = Field(16, ge=1, description="Download threads per process.")
    distributor: Literal["multiprocessing", "ray"] = Field(
        "multiprocessing",
        description="img2dataset distributor; 'ray' runs shards as Ray tasks (see the ray: section).")
    timeout: int = Field(10, ge=1, description="Seconds one URL's request may take in all (connect, redirects, "
                                               "headers and body), not per read.")
    retries: int = Field(2, ge=0, description="Extra attempts per URL after an answer that may change (5xx, 408, "
                                              "429, timeout, broken connection); a 4xx or a refusal is final.")
    max_shard_retry: int = Field(1, ge=0, description="How often img2dataset retries a shard whose worker crashed.")
    user_agent_token: str | None = Field(
        "clipmill", description="Token added to the User-Agent; X-Robots-Tag directives addressed to it apply too.")
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that make a URL opt out of training (empty list: ignore the header).")
    allow_private_hosts: bool = Field(
        False, description="Download from loopback, private, link-local, reserved and cloud-metadata addresses.")
    max_redirects: int = Field(5, ge=0, le=30, description="Redirects followed per URL, each hop checked again.")
    max_body_bytes: int = Field(
        32 * 2**20, ge=1024, description="Largest response body, in bytes, as announced, sent and after "
                                           "Content-Encoding (larger: body_too_large).")
    max_image_area: int = Field(
        40_000_000, ge=64, description="Largest image, in pixels (width x height, read from the header before "
                                       "decoding); larger ones fail as image_too_large.")
    mirrors: list[MirrorParams] = Field(
        default_factory=list,
        description="URL prefixes served from local directories: the stage starts a loopback HTTP server for each "
                    "mirror its URLs use and fetches the prefix from it (the one private origin allowed).")
    max_caption_chars: int = Field(
        4096, ge=16, description="Captions are cut to this many characters when the URL list is read (counted "
                                 "as captions_truncated).")

    @field_validator("mirrors")
    @classmethod
    def _distinct_prefixes(cls, mirrors: list[MirrorParams]) -> list[MirrorParams]:
        prefixes = [m.prefix for m in mirrors]
        for prefix in prefixes:
            inner = [p for p in prefixes if p != prefix and (p + "/").startswith(prefix + "/")]
            if prefixes.count(prefix) > 1 or inner:
                raise ValueError(f"prefix {prefix!r} overlaps another mirror's")
        return mirrors

    def fingerprint(self) -> dict:
        """The settings that decide what a run produces (see NOT_FINGERPRINTED)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in NOT_FINGERPRINTED}

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "download": (DownloadParams,
        'img2dataset: URL list -> <data_dir>/download (shards/, manifest.parquet, summary.json).'),
}
