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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from clipmill.components.common.errors import InputError
from clipmill.components.common.hashing import file_sha256, hash_obj
from clipmill.components.common.io import atomic_path, read_json, write_json
from clipmill.components.common.log import get_logger
from clipmill.components.common.mirror import ROUTES_FILE

from .url_list import CRAWL_COLUMN, DEFAULT_MAX_CAPTION_CHARS, UrlList, read_url_list

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


@dataclass
class Crawl:
    """The whole crawl: one checked ``UrlList`` (with a ``url_list`` passthrough column naming each URL's list),
    the web/ directories appended lists brought (by list name), and per-list counts."""

    url_list: UrlList
    web_dirs: dict[str, Path]
    lists: list[dict]  # name, path, sha256, urls (listed), duplicates (uids an earlier list already had), counts
    sha256: str  # of all lists, in order

    @property
    def duplicates(self) -> int:
        return sum(entry["duplicates"] for entry in self.lists)


def _repeated_uids(path: Path, table: pd.DataFrame, tables: list[pd.DataFrame], seen: set) -> pd.Series:
    """Rows whose uid an earlier list has: the same (url, caption) again, else an ``InputError`` (a collision)."""
    repeated = table["uid"].isin(seen)
    if repeated.any():
        earlier = pd.concat(tables).set_index("uid").loc[table.loc[repeated, "uid"]]
        again = table.loc[repeated]
        differs = (earlier["url"].to_numpy() != again["url"].to_numpy()) | \
                  (earlier["caption"].to_numpy() != again["caption"].to_numpy())
        if differs.any():
            uid = again["uid"].iloc[differs.argmax()]
            raise InputError(path, f"{int(differs.sum())} uid(s) already in the crawl with another url or caption, "
                                   f"e.g. {uid!r} (in list {earlier.loc[uid, CRAWL_COLUMN]})", field="uid")
    return repeated


def read_crawl(urls: str | os.PathLike | None, additions_dir: str | os.PathLike | None = None, *,
               max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS, extra: list[tuple[str, Path]] = ()) -> Crawl:
    """The base list followed by the appended ones (and ``extra`` lists, to check a list before it is appended).
    A uid an earlier list already holds with the same url and caption is not fetched again (counted as a
    duplicate of its list); with another url or caption it is an ``InputError`` naming the later list. A
    passthrough column must have one type across the lists. ``urls`` None: the appended lists alone."""
    additions = list_additions(additions_dir)
    parts = ([(BASE_LIST, Path(urls))] if urls is not None else []) + [(a.id, a.urls) for a in additions] + list(extra)
    tables, lists, passthrough, dtypes, seen, seen_urls = [], [], [], {}, set(), set()
    for name, path in parts:
        part = read_url_list(path, max_caption_chars)
        for column in part.passthrough:
            dtype = part.table[column].dtype
            if column in dtypes and dtypes[column] != dtype:
                raise InputError(path, f"type {dtype} differs from {dtypes[column]} in an earlier list of the crawl",
                                 field=column)
            if column not in dtypes:
                dtypes[column] = dtype
                passthrough.append(column)
        table = part.table
        repeated = _repeated_uids(path, table, tables, seen)
        seen.update(table["uid"])
        kept = table.loc[~repeated]
        duplicate_urls = part.duplicate_urls + int(kept["url"].drop_duplicates().isin(seen_urls).sum())
        seen_urls.update(kept["url"])
        lists.append({"name": name, "path": str(path), "sha256": file_sha256(path), "urls": len(table),
                      "duplicates": int(repeated.sum()), "captions_cleaned": part.captions_cleaned,
                      "captions_missing": part.captions_missing, "captions_truncated": part.captions_truncated,
                      "duplicate_urls": duplicate_urls})
        if repeated.any():
            log.warning("%s: %d URL(s) already in an earlier list of the crawl are not fetched again", path,
                        int(repeated.sum()))
        if duplicate_urls:
            log.warning("%s: %d URL(s) repeat an earlier URL of the crawl with another caption or uid", path,
                        duplicate_urls)
        tables.append(kept.assign(**{CRAWL_COLUMN: name}))
    table = pd.concat(tables, ignore_index=True)
    combined = UrlList(table, [*passthrough, CRAWL_COLUMN], sum(e["captions_cleaned"] for e in lists),
                       sum(e["captions_missing"] for e in lists), sum(e["captions_truncated"] for e in lists),
                       sum(e["duplicate_urls"] for e in lists))
    web_dirs = {a.id: a.web for a in additions if a.web is not None and (a.web / ROUTES_FILE).is_file()}
    digest = lists[0]["sha256"] if len(lists) == 1 else hash_obj([e["sha256"] for e in lists])
    return Crawl(combined, web_dirs, lists, digest)


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
    checked = read_url_list(source)  # every problem is one InputError before anything is written
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
        write_json({"source": str(source.resolve()), "sha256": sha, "urls": len(checked.table),
                    "appended_at": now.isoformat(timespec="seconds")}, tmp / SOURCE_FILE)
    log.info("appended %s (%d URLs) to the crawl as %s", source, len(checked.table), addition.path)
    return addition
