"""Reading and checking the URL list before anything is downloaded or written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.common.errors import InputError
from components.common.hashing import make_uid

# Output columns of img2dataset: an input column with one of these names would be overwritten.
RESERVED_COLUMNS = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                              "status", "error_message", "exif", "md5", "sha256", "sha512"})


@dataclass
class UrlList:
    """The checked list: uid, url, caption (valid UTF-8) and passthrough columns, in input order."""

    table: pd.DataFrame
    passthrough: list[str]
    captions_cleaned: int
    captions_missing: int


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _rows(mask: pd.Series, limit: int = 5) -> str:
    rows = [str(i) for i in mask[mask].index[:limit]]
    more = f" and {int(mask.sum()) - limit} more" if mask.sum() > limit else ""
    return ", ".join(rows) + more


def _clean_captions(column: pa.ChunkedArray) -> tuple[list[str], int, int]:
    """Decode captions (text or binary) as UTF-8; invalid sequences become U+FFFD. Returns (captions, cleaned, missing)."""
    raw = column.cast(pa.binary()) if _is_text(column.type) else column
    captions, cleaned, missing = [], 0, 0
    for value in raw.to_pylist():
        if value is None:
            missing += 1
            captions.append("")
            continue
        try:
            captions.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            cleaned += 1
            captions.append(value.decode("utf-8", errors="replace"))
    return captions, cleaned, missing


def _is_json_scalar(t: pa.DataType) -> bool:
    return (_is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_null(t))


def read_url_list(path: str | Path) -> UrlList:
    """Read and check a URL list; every problem is one ``InputError`` naming the file, field and reason.

    Captions that are not valid UTF-8 are kept, decoded with replacement characters and counted;
    missing captions become empty strings and are counted. A missing ``uid`` column is computed with
    ``make_uid(url, caption)``.
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
            raise InputError(path, f"missing required column (columns: {', '.join(schema.names) or 'none'})", field=required)
    if table.num_rows == 0:
        raise InputError(path, "the URL list is empty")
    if not _is_text(schema.field("url").type):
        raise InputError(path, f"expected text, got {schema.field('url').type}", field="url")
    if not (_is_text(schema.field("caption").type) or _is_bytes(schema.field("caption").type)):
        raise InputError(path, f"expected text or bytes, got {schema.field('caption').type}", field="caption")

    passthrough = [c for c in schema.names if c not in ("url", "caption", "uid")]
    for name in passthrough:
        if name in RESERVED_COLUMNS:
            raise InputError(path, "column name is reserved for the download results; rename it", field=name)
        if not _is_json_scalar(schema.field(name).type):
            raise InputError(path, f"passthrough columns must be text, numbers or booleans, got {schema.field(name).type}",
                             field=name)

    captions, cleaned, missing = _clean_captions(table.column("caption"))
    df = pd.DataFrame({"url": table.column("url").to_pylist(), "caption": captions})
    if "uid" in schema.names:
        if not _is_text(schema.field("uid").type):
            raise InputError(path, f"expected text, got {schema.field('uid').type}", field="uid")
        df.insert(0, "uid", table.column("uid").to_pylist())
        null = df["uid"].isna()
        if null.any():
            raise InputError(path, f"{int(null.sum())} null uid(s) (rows {_rows(null)})", field="uid")
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
    return UrlList(df, passthrough, cleaned, missing)
