"""URL lists appended to the crawl (``clipmill run full --new-urls``), and the crawl they make together.

The crawl is the base URL list (``download.urls``) followed by every appended list, oldest first. Each appended
list is one directory of the additions directory (``data/crawl_additions/<id>/``, DVC-tracked one by one, so
every append is a data version of its own):

- ``urls.parquet``: the list as given (checked like any URL list);
- ``web/`` (when the list brought one): mirror files for its URLs, served with the ``download.mirrors`` entry
  whose prefix its URLs start with (``mirror.py``);
- ``source.json``: where the list came from, its sha256 and when it was appended.

``<id>`` is ``<UTC time>-<sha256 prefix>``, so sorting the ids gives the order of the appends.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from clipmill.components.common.errors import InputError
from clipmill.components.common.hashing import file_sha256, hash_obj
from clipmill.components.common.io import atomic_path, read_json, write_json
from clipmill.components.common.log import get_logger
from clipmill.components.common.mirror import ROUTES_FILE

from .url_list import (
    CRAWL_COLUMN,
    DEFAULT_MAX_CAPTION_CHARS,
    iter_list_rows,
    passthrough_columns,
    passthrough_dtypes,
    read_url_list,
)

log = get_logger("download")

URLS_FILE = "urls.parquet"
SOURCE_FILE = "source.json"
WEB_DIR = "web"
BASE_LIST = "crawl"  # the name of the base list in counts and in each URL's ``url_list``


@dataclass(frozen=True)
class Addition:
    id: str
    path: Path  # the addition's directory

    @property
    def urls(self) -> Path:
        return self.path / URLS_FILE

    @property
    def web(self) -> Path | None:
        web = self.path / WEB_DIR
        return web if web.is_dir() else None


def list_additions(additions_dir: str | os.PathLike | None) -> list[Addition]:
    """The appended lists in append order. A list DVC tracks but the work tree lacks is an ``InputError``
    (its data is in the DVC cache or remote: ``dvc pull`` restores it)."""
    if additions_dir is None:
        return []
    root = Path(additions_dir)
    if not root.is_dir():
        raise InputError(root, "no such directory (it holds the URL lists appended to the crawl; "
                               "restore it with `git checkout` and `dvc pull`)")
    found = []
    for entry in sorted(root.iterdir()):
        if entry.suffix == ".dvc":
            target = entry.with_suffix("")
            if not (target / URLS_FILE).is_file():
                raise InputError(target, f"appended URL list tracked by {entry.name} is not in the work tree: "
                                         "run `dvc pull` (or `dvc checkout`) first")
        elif entry.is_dir() and not entry.name.startswith("."):
            if not (entry / URLS_FILE).is_file():
                raise InputError(entry, f"an appended list without {URLS_FILE}")
            found.append(Addition(entry.name, entry))
    return found


ENTRY_FIELDS = ("name", "path", "sha256", "urls", "duplicates", "captions_cleaned", "captions_missing",
                "captions_truncated", "duplicate_urls")  # a list's record in the crawl, in this order


@dataclass
class Crawl:
    """The whole crawl: its lists' records (name, path, sha256, ``urls`` listed, ``duplicates``: uids an earlier
    list already had, caption counts, ``duplicate_urls``), their passthrough columns, the web/ directories appended
    lists brought (by list name) and the sha256 of all lists. No list's rows are held: ``table`` reads one."""

    lists: list[dict]
    passthrough: list[str]  # the lists' passthrough columns, then CRAWL_COLUMN
    web_dirs: dict[str, Path]
    sha256: str  # of all lists, in order
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    # per list, the uids an earlier list had; None for a list whose record was given (``read_crawl``'s recorded)
    repeated: dict[str, frozenset | None] = field(default_factory=dict)
    dtypes: dict[str, dict] = field(default_factory=dict)  # per list, its passthrough columns' dtypes (when read)

    @property
    def duplicates(self) -> int:
        return sum(entry["duplicates"] for entry in self.lists)

    @property
    def captions_truncated(self) -> int:
        return sum(entry["captions_truncated"] for entry in self.lists)

    @property
    def duplicate_urls(self) -> int:
        return sum(entry["duplicate_urls"] for entry in self.lists)

    def _dtypes(self, entry: dict) -> dict:
        if entry["name"] not in self.dtypes:
            self.dtypes[entry["name"]] = passthrough_dtypes(entry["path"])
        return self.dtypes[entry["name"]]

    def table(self, name: str) -> pd.DataFrame:
        """The rows of list ``name`` that no earlier list had: uid, url, caption, every passthrough column of the
        crawl (with the dtype it has across the lists: a column some list lacks is empty there) and
        ``CRAWL_COLUMN``. Read from the list's file now, so one list is in memory at a time."""
        at = [entry["name"] for entry in self.lists].index(name)
        entry = self.lists[at]
        table = read_url_list(entry["path"], self.max_caption_chars).table
        repeated = self.repeated.get(name)
        if repeated is None:
            found = _earlier_rows([(e["name"], Path(e["path"])) for e in self.lists[:at]], set(table["uid"]), set(),
                                  self.max_caption_chars)[0]
            repeated = frozenset(found["uid"])
        if repeated:
            table = table.loc[~table["uid"].isin(repeated)]
        every = [self._dtypes(e) for e in self.lists]
        for column in self.passthrough[:-1]:
            dtypes = [d[column] for d in every if column in d]
            dtype = dtypes[0]
            if len(dtypes) < len(every) and dtype.kind in "iu":
                dtype = np.dtype(np.float64)  # as pandas puts the lists together: NaN where a list lacks it
            elif len(dtypes) < len(every) and dtype.kind == "b":
                dtype = np.dtype(object)
            table = table.assign(**{column: table[column].astype(dtype) if column in table
                                    else pd.Series(np.nan if dtype.kind == "f" else None, index=table.index,
                                                   dtype=dtype)})
        table = table.assign(**{CRAWL_COLUMN: name})
        return table[["uid", "url", "caption", *self.passthrough]].reset_index(drop=True)


def _hashes(values) -> np.ndarray:
    """The sorted distinct 64-bit hashes of ``values`` (text): what the earlier lists are checked against."""
    return np.unique(pd.util.hash_array(np.asarray(values, dtype=object)))


def _hits(values, seen: list[np.ndarray]) -> np.ndarray:
    """Which of ``values`` hash to a value in one of the sorted ``seen`` arrays (equal ones always do; others with
    probability about n / 2**64, so every hit is confirmed on the values themselves)."""
    hashes = pd.util.hash_array(np.asarray(values, dtype=object))
    hit = np.zeros(len(hashes), dtype=bool)
    for known in seen:
        if len(known):
            at = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
            hit |= known[at] == hashes
    return hit


def _earlier_rows(parts: list[tuple[str, Path]], uids: set, urls: set, max_caption_chars: int
                  ) -> tuple[pd.DataFrame, set]:
    """The first row (uid, url, caption, list name) of each of ``uids`` in the lists ``parts``, and which of
    ``urls`` they have: one streaming pass over those lists (only when a later list's hashes hit theirs)."""
    rows, found_urls = [], set()
    if uids or urls:
        for name, path in parts:
            for batch in iter_list_rows(path, max_caption_chars):
                if uids:
                    rows.append(batch.loc[batch["uid"].isin(uids)].assign(**{CRAWL_COLUMN: name}))
                if urls:
                    found_urls.update(batch.loc[batch["url"].isin(urls), "url"])
    columns = ["uid", "url", "caption", CRAWL_COLUMN]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    return table.drop_duplicates("uid").set_index("uid", drop=False), found_urls


def _check_list(path: Path, table: pd.DataFrame, earlier: list[tuple[str, Path]], seen_uids: list[np.ndarray],
                seen_urls: list[np.ndarray], max_caption_chars: int) -> tuple[frozenset, int]:
    """(the uids of ``table`` an earlier list has, the distinct URLs of the others an earlier list has). A uid an
    earlier list has with another url or caption is an ``InputError`` (a collision)."""
    maybe_uids = set(table.loc[_hits(table["uid"], seen_uids), "uid"])
    urls = table["url"].drop_duplicates()
    maybe_urls = set(urls[_hits(urls, seen_urls)])
    found, found_urls = _earlier_rows(earlier, maybe_uids, maybe_urls, max_caption_chars)
    repeated = table["uid"].isin(found.index)
    if repeated.any():
        again = table.loc[repeated]
        before = found.loc[again["uid"]]
        differs = (before["url"].to_numpy() != again["url"].to_numpy()) | \
                  (before["caption"].to_numpy() != again["caption"].to_numpy())
        if differs.any():
            uid = again["uid"].iloc[differs.argmax()]
            raise InputError(path, f"{int(differs.sum())} uid(s) already in the crawl with another url or caption, "
                                   f"e.g. {uid!r} (in list {before.loc[uid, CRAWL_COLUMN]})", field="uid")
    kept_urls = table.loc[~repeated, "url"].drop_duplicates()
    return frozenset(table.loc[repeated, "uid"]), int(kept_urls.isin(found_urls).sum())


def _check_dtypes(path: Path, dtypes: dict, first: dict, passthrough: list[str]) -> None:
    """A passthrough column has one type across the lists (``first``: the first list's, None where not read)."""
    for column, dtype in dtypes.items():
        if dtype is not None and first.get(column) is not None and first[column] != dtype:
            raise InputError(path, f"type {dtype} differs from {first[column]} in an earlier list of the crawl",
                             field=column)
        if column not in passthrough:
            passthrough.append(column)
        if first.get(column) is None:
            first[column] = dtype


def _streamed_hashes(path: Path, max_caption_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct hashes of a list's uids and of its URLs, its rows streamed."""
    uid_parts, url_parts = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for batch in iter_list_rows(path, max_caption_chars):
        uid_parts.append(_hashes(batch["uid"]))
        url_parts.append(_hashes(batch["url"]))
    return np.unique(np.concatenate(uid_parts)), np.unique(np.concatenate(url_parts))


def _check_and_add(crawl: Crawl, name: str, path: Path, sha: str, earlier: list[tuple[str, Path]],
                   seen: tuple[list, list], first_dtype: dict, needed: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Read and check list ``name`` against the ``earlier`` lists (whose hashes are ``seen``) and add its record to
    ``crawl``; returns the hashes of its uids and URLs when a later list is ``needed`` to be checked against it."""
    part = read_url_list(path, crawl.max_caption_chars)
    crawl.dtypes[name] = {column: part.table[column].dtype for column in part.passthrough}
    _check_dtypes(path, crawl.dtypes[name], first_dtype, crawl.passthrough)
    repeated, earlier_urls = _check_list(path, part.table, earlier, *seen, crawl.max_caption_chars)
    crawl.repeated[name] = repeated
    duplicate_urls = part.duplicate_urls + earlier_urls
    crawl.lists.append(dict(zip(ENTRY_FIELDS, (
        name, str(path), sha, len(part.table), len(repeated), part.captions_cleaned, part.captions_missing,
        part.captions_truncated, duplicate_urls))))
    if repeated:
        log.warning("%s: %d URL(s) already in an earlier list of the crawl are not fetched again", path,
                    len(repeated))
    if duplicate_urls:
        log.warning("%s: %d URL(s) repeat an earlier URL of the crawl with another caption or uid", path,
                    duplicate_urls)
    return (_hashes(part.table["uid"]), _hashes(part.table["url"])) if needed else None


def read_crawl(urls: str | os.PathLike | None, additions_dir: str | os.PathLike | None = None, *,
               max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS, extra: list[tuple[str, Path]] = (),
               recorded: Callable[[str, str, str, list[str]], dict | None] | None = None) -> Crawl:
    """The base list followed by the appended ones (and ``extra`` lists, to check a list before it is appended).
    A uid an earlier list already holds with the same url and caption is not fetched again (counted as a
    duplicate of its list); with another url or caption it is an ``InputError`` naming the later list. A
    passthrough column must have one type across the lists. ``urls`` None: the appended lists alone.

    Lists are read one at a time; what later lists are checked against is kept as sorted 64-bit hashes of the
    earlier lists' uids and URLs (16 bytes a URL), and a hit is confirmed by a pass over the earlier lists.
    ``recorded(name, path, sha256, earlier lists' sha256)`` may return a list's record from an earlier check (the
    download's record of a list it finished): that list is not checked again, and is read (streamed, for its uids
    and URLs) only when a later list needs checking."""
    additions = list_additions(additions_dir)
    parts = ([(BASE_LIST, Path(urls))] if urls is not None else []) + [(a.id, a.urls) for a in additions] + list(extra)
    for _, path in parts:
        if not Path(path).is_file():
            raise InputError(path, "no such file")
    shas = [file_sha256(path) for _, path in parts]
    records = [recorded(name, str(path), sha, shas[:i]) if recorded else None
               for i, ((name, path), sha) in enumerate(zip(parts, shas))]
    last_checked = max((i for i, r in enumerate(records) if r is None), default=-1)
    crawl = Crawl([], [], {}, "", max_caption_chars)
    first_dtype, seen_uids, seen_urls = {}, [], []
    for i, ((name, path), sha, record) in enumerate(zip(parts, shas, records)):
        needed = i < last_checked  # a later list is checked against this one
        if record is not None:
            crawl.lists.append({k: record[k] for k in ENTRY_FIELDS})
            crawl.repeated[name] = None
            names = passthrough_columns(pq.read_schema(path).names)
            _check_dtypes(path, crawl._dtypes(crawl.lists[-1]) if needed else dict.fromkeys(names), first_dtype,
                          crawl.passthrough)
            hashes = _streamed_hashes(path, max_caption_chars) if needed else None
        else:
            hashes = _check_and_add(crawl, name, path, sha, parts[:i], (seen_uids, seen_urls), first_dtype, needed)
        if needed:
            seen_uids.append(hashes[0])
            seen_urls.append(hashes[1])
    crawl.passthrough.append(CRAWL_COLUMN)
    crawl.web_dirs = {a.id: a.web for a in additions if a.web is not None and (a.web / ROUTES_FILE).is_file()}
    crawl.sha256 = shas[0] if len(shas) == 1 else hash_obj(shas)
    return crawl


class AlreadyAppended(InputError):
    """The URL list's content is in the crawl already (as the addition ``id``)."""

    def __init__(self, source: Path, addition_id: str):
        self.addition_id = addition_id
        super().__init__(source, f"this URL list was appended to the crawl before (as {addition_id})")


def _check_plain_tree(web: Path) -> None:
    """A web/ directory to copy holds plain files and directories only: a symbolic link is an ``InputError``."""
    if web.is_symlink():
        raise InputError(web, "is a symbolic link: an appended list's web/ directory is copied, never followed")
    for folder, dirs, files in os.walk(web):
        for name in dirs + files:
            if (Path(folder) / name).is_symlink():
                raise InputError(Path(folder) / name, "is a symbolic link: an appended list's web/ directory must "
                                                      "hold plain files only")


def append_url_list(source: str | os.PathLike, additions_dir: str | os.PathLike, *,
                    now: dt.datetime | None = None, crawl_urls: str | os.PathLike | None = None) -> Addition:
    """Check ``source`` (a URL list) and append it to the crawl as a new directory of ``additions_dir``.

    Before anything is copied, the list is checked on its own (``read_url_list``) and as the last list of the
    crawl (the base list ``crawl_urls`` when given, and every list appended before): a uid the crawl holds with
    another url or caption, a passthrough column of another type, a reserved column are each one ``InputError``
    naming ``source``. A list whose content was appended before is refused (``AlreadyAppended``). A mirror
    directory beside the list (``web/`` holding a ``routes.json``) comes along: the download serves it with the
    mirror whose prefix the list's URLs start with. It must hold no symbolic links.
    """
    source = Path(source)
    urls = len(read_url_list(source).table)  # every problem is one InputError before anything is written
    sha = file_sha256(source)
    root = Path(additions_dir)
    if root.is_dir():
        for earlier in root.iterdir():
            record = earlier / SOURCE_FILE
            if record.is_file() and read_json(record).get("sha256") == sha:
                raise AlreadyAppended(source, earlier.name)
        read_crawl(crawl_urls, root, extra=[("new", source)])
    elif crawl_urls is not None:
        read_crawl(crawl_urls, None, extra=[("new", source)])
    web = source.parent / WEB_DIR
    copy_web = (web / ROUTES_FILE).is_file()
    if copy_web:
        _check_plain_tree(web)
    root.mkdir(parents=True, exist_ok=True)
    now = now or dt.datetime.now(dt.UTC)
    addition_id = f"{now:%Y%m%dT%H%M%SZ}-{sha[:8]}"
    addition = Addition(addition_id, root / addition_id)
    with atomic_path(addition.path) as tmp:
        tmp.mkdir()
        shutil.copyfile(source, tmp / URLS_FILE)
        if copy_web:
            shutil.copytree(web, tmp / WEB_DIR, symlinks=True)  # checked: none; a link made since is not followed
        write_json({"source": str(source.resolve()), "sha256": sha, "urls": urls,
                    "appended_at": now.isoformat(timespec="seconds")}, tmp / SOURCE_FILE)
    log.info("appended %s (%d URLs) to the crawl as %s", source, urls, addition.path)
    return addition
