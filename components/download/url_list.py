"""Reading and checking the URL list before anything is downloaded or written.

- ``uid`` (given or computed) matches ``UID_PATTERN``: it becomes a tar member name, so no dots, slashes or
  empty names; a bad one is one ``InputError`` naming the file, the field and the first bad rows.
- Captions are decoded as UTF-8 (invalid sequences become U+FFFD, counted as ``captions_cleaned``), cut to
  ``max_caption_chars`` characters (counted as ``captions_truncated``: an 80 MB caption is never held whole,
  only its first ``4 * max_caption_chars`` bytes are decoded), and their whitespace is collapsed to single spaces
  (leading and trailing whitespace removed).
- A URL that an earlier row already has (with another caption or uid) is kept, each row its own sample, and
  counted as ``duplicate_urls``.
"""
from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipmill.components.common.errors import InputError
from clipmill.components.common.hashing import make_uid

# Output columns of img2dataset: an input column with one of these names would be overwritten.
RESERVED_COLUMNS = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                              "status", "error_message", "exif", "md5", "sha256", "sha512"})
CRAWL_COLUMN = "url_list"  # added by the crawl: the list each URL comes from
UID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
UID_RULE = "letters, digits, '_' and '-' only, 1 to 128 characters"
DEFAULT_MAX_CAPTION_CHARS = 4096


@dataclass
class UrlList:
    """The checked list: uid, url, caption (valid UTF-8) and passthrough columns, in input order."""

    table: pd.DataFrame
    passthrough: list[str]
    captions_cleaned: int
    captions_missing: int
    captions_truncated: int = 0
    duplicate_urls: int = 0


def passthrough_columns(names: list[str]) -> list[str]:
    """A URL list's passthrough columns: every column but url, caption and uid, in file order."""
    return [c for c in names if c not in ("url", "caption", "uid")]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _rows(mask: pd.Series, limit: int = 5) -> str:
    rows = [str(i) for i in mask[mask].index[:limit]]
    more = f" and {int(mask.sum()) - limit} more" if mask.sum() > limit else ""
    return ", ".join(rows) + more


def _decode(value: bytes, final: bool) -> tuple[str, bool]:
    """(text, whether invalid UTF-8 was replaced); a cut ``value`` (not ``final``) may end inside a character."""
    try:
        return codecs.getincrementaldecoder("utf-8")("strict").decode(value, final), False
    except UnicodeDecodeError:
        return codecs.getincrementaldecoder("utf-8")("replace").decode(value, final), True


def _clean_captions(column: pa.ChunkedArray, max_chars: int) -> tuple[list[str], int, int, int]:
    """Decode captions (text or binary) as UTF-8 (invalid sequences become U+FFFD), cut them to ``max_chars``
    characters and collapse their whitespace. Returns (captions, cleaned, missing, truncated)."""
    raw = column.cast(pa.binary()) if _is_text(column.type) else column
    max_bytes = 4 * max_chars  # holds at least max_chars whole characters
    lengths = pc.binary_length(raw).to_pylist()
    captions, cleaned, missing, truncated = [], 0, 0, 0
    for value, length in zip(pc.binary_slice(raw, 0, max_bytes).to_pylist(), lengths):
        if value is None:
            missing += 1
            captions.append("")
            continue
        text, replaced = _decode(value, final=length <= max_bytes)
        cleaned += replaced
        if len(text) > max_chars or length > max_bytes:
            truncated += 1
            text = text[:max_chars]
        captions.append(" ".join(text.split()))
    return captions, cleaned, missing, truncated


def _check_uids(path: Path, uids: pd.Series) -> None:
    bad = ~uids.map(lambda u: isinstance(u, str) and UID_PATTERN.fullmatch(u) is not None)
    if bad.any():
        example = uids[bad].iloc[0]
        raise InputError(path, f"{int(bad.sum())} uid(s) not made of {UID_RULE} (a uid names files in the "
                               f"shards), e.g. {str(example)[:80]!r} (rows {_rows(bad)})", field="uid")


def _is_json_scalar(t: pa.DataType) -> bool:
    return (_is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_null(t))


def read_url_list(path: str | Path, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> UrlList:
    """Read and check a URL list (see the module docstring); every problem is one ``InputError`` naming the file,
    field and reason.

    Captions that are not valid UTF-8 are kept, decoded with replacement characters and counted;
    missing captions become empty strings and are counted. A missing ``uid`` column is computed with
    ``make_uid(url, caption)`` (of the cleaned caption).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(path, f"not a parquet file ({e})") from None
    schema = table.schema
    for required in ("url", "caption"):
        if required not in schema.names:
            raise InputError(path, f"missing required column (columns: {', '.join(schema.names) or 'none'})",
                             field=required)
    if table.num_rows == 0:
        raise InputError(path, "the URL list is empty")
    if not _is_text(schema.field("url").type):
        raise InputError(path, f"expected text, got {schema.field('url').type}", field="url")
    if not (_is_text(schema.field("caption").type) or _is_bytes(schema.field("caption").type)):
        raise InputError(path, f"expected text or bytes, got {schema.field('caption').type}", field="caption")

    passthrough = passthrough_columns(schema.names)
    for name in passthrough:
        if name == CRAWL_COLUMN:
            raise InputError(path, "column name is reserved for the list each URL comes from; rename it", field=name)
        if name in RESERVED_COLUMNS:
            raise InputError(path, "column name is reserved for the download results; rename it", field=name)
        if not _is_json_scalar(schema.field(name).type):
            raise InputError(path, "passthrough columns must be text, numbers or booleans, "
                             f"got {schema.field(name).type}", field=name)

    captions, cleaned, missing, truncated = _clean_captions(table.column("caption"), max_caption_chars)
    df = pd.DataFrame({"url": table.column("url").to_pylist(), "caption": captions})
    if "uid" in schema.names:
        if not _is_text(schema.field("uid").type):
            raise InputError(path, f"expected text, got {schema.field('uid').type}", field="uid")
        df.insert(0, "uid", table.column("uid").to_pylist())
        null = df["uid"].isna()
        if null.any():
            raise InputError(path, f"{int(null.sum())} null uid(s) (rows {_rows(null)})", field="uid")
        _check_uids(path, df["uid"])
        origin = ""
    else:
        df.insert(0, "uid", [make_uid(u or "", c) for u, c in zip(df["url"], df["caption"])])
        origin = " (computed from url + caption: the list repeats the same pair)"
    dup = df["uid"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "uid"].iloc[0]
        raise InputError(path, f"{int(df['uid'].duplicated().sum())} duplicate uid(s){origin}, e.g. {first!r} "
                               f"(rows {_rows(df['uid'] == first)})", field="uid")
    for name in passthrough:
        df[name] = table.column(name).to_pandas()
    return UrlList(df, passthrough, cleaned, missing, truncated, int(df["url"].duplicated().sum()))


def iter_list_rows(path: str | Path, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
                   batch_rows: int = 65_536) -> Iterator[pd.DataFrame]:
    """The uid, url and caption of a list ``read_url_list`` accepted before, ``batch_rows`` rows at a time: the
    captions cleaned and the uids computed as there, without holding the list."""
    source = pq.ParquetFile(path)
    columns = [c for c in ("uid", "url", "caption") if c in source.schema_arrow.names]
    for batch in source.iter_batches(batch_size=batch_rows, columns=columns):
        captions = _clean_captions(pa.chunked_array([batch.column("caption")]), max_caption_chars)[0]
        urls = batch.column("url").to_pylist()
        uids = (batch.column("uid").to_pylist() if "uid" in columns
                else [make_uid(u or "", c) for u, c in zip(urls, captions)])
        yield pd.DataFrame({"uid": uids, "url": urls, "caption": captions})


def pandas_dtype(arrow_type: pa.DataType, nulls: bool) -> object:
    """The dtype ``to_pandas`` gives a passthrough column of ``arrow_type`` (with ``nulls`` or without)."""
    if pa.types.is_null(arrow_type) or _is_text(arrow_type) or (nulls and pa.types.is_boolean(arrow_type)):
        return np.dtype(object)
    if nulls and pa.types.is_integer(arrow_type):
        return np.dtype(np.float64)
    return np.dtype(arrow_type.to_pandas_dtype())


def passthrough_dtypes(path: str | Path, batch_rows: int = 65_536) -> dict[str, object]:
    """The pandas dtype of each passthrough column of a list ``read_url_list`` accepted before (as its table would
    have it), from the schema and the columns' null counts, read ``batch_rows`` rows at a time."""
    source = pq.ParquetFile(path)
    names = passthrough_columns(source.schema_arrow.names)
    nulls = dict.fromkeys(names, 0)
    if names:
        for batch in source.iter_batches(batch_size=batch_rows, columns=names):
            for name in names:
                nulls[name] += batch.column(name).null_count
    return {name: pandas_dtype(source.schema_arrow.field(name).type, nulls[name] > 0) for name in names}
