"""Finding the raw files: local folders, single files and fsspec / pyarrow.fs URIs.

Listing is cheap (names, sizes, modification times; no content is read) so the
flow can fingerprint the sources with `source_digest` and skip the stage when
nothing changed. Problems found while listing (a symlink loop, a folder that
can't be read, a FIFO named `.txt`) are returned as entries with an `error`,
so the stage quarantines them instead of skipping them silently.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from refinery.storage.manifest import stable_hash
from refinery.tasks.ingest.config import IngestConfig


@dataclass(frozen=True)
class SourceFile:
    """One raw file to read (or a listing problem to quarantine)."""

    uri: str  # `file:///abs/path` for local files, the fsspec URI otherwise
    rel: str  # path relative to its source root, used for globs
    path: str  # what to open: a local path, or the path inside `protocol`'s filesystem
    protocol: str  # "file" for local files
    size: int = -1
    mtime_ns: int = -1
    error: tuple[str, str] | None = None  # (reason code, message) when it can't be read at all

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"


# -- glob matching ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob with `**` (any number of folders) into a regex over `/`-paths."""
    i, out = 0, []
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def glob_match(rel: str, patterns: Iterable[str]) -> bool:
    return any(_glob_regex(p).match(rel) for p in patterns)


def selected(rel: str, cfg: IngestConfig) -> bool:
    """True if a file at `rel` (relative to its source root) is to be read."""
    return glob_match(rel, cfg.include) and not glob_match(rel, cfg.exclude)


def _dir_excluded(rel_dir: str, cfg: IngestConfig) -> bool:
    # Prune a folder when it matches an exclude pattern itself or everything inside it would.
    return glob_match(rel_dir, cfg.exclude) or glob_match(rel_dir + "/\x00", cfg.exclude)


# -- URIs ------------------------------------------------------------------------------------


def local_uri(path: str) -> str:
    """A `file://` URI for a local path; odd bytes and newlines are percent-encoded."""
    return "file://" + quote(os.fsencode(os.path.abspath(path)), safe="/")


def _safe_text(s: str) -> str:
    """Names from remote listings can carry bytes that aren't UTF-8; keep them as escapes."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# -- listing ---------------------------------------------------------------------------------


def list_sources(sources: list[str], cfg: IngestConfig) -> list[SourceFile]:
    """Every file the sources name, sorted by URI and without duplicates."""
    seen: dict[str, SourceFile] = {}
    for source in sources:
        for sf in _list_one(str(source), cfg):
            seen.setdefault(sf.uri, sf)
    return [seen[k] for k in sorted(seen)]


def _list_one(source: str, cfg: IngestConfig) -> Iterator[SourceFile]:
    protocol, _, rest = source.partition("://")
    if not rest:
        yield from _list_local(source, cfg)
    elif protocol == "file":
        yield from _list_local(rest, cfg)
    else:
        yield from _list_remote(source, cfg)


def _list_local(root: str, cfg: IngestConfig) -> Iterator[SourceFile]:
    root = os.path.abspath(os.path.expanduser(root))
    try:
        st = os.stat(root)
    except OSError as exc:
        if os.path.lexists(root):
            yield _local_error(root, os.path.basename(root), exc)
            return
        raise FileNotFoundError(f"ingest source {root!r} does not exist; check the --source path") from exc
    if stat.S_ISDIR(st.st_mode):
        yield from _walk(root, "", cfg, visited={(st.st_dev, st.st_ino)}, real_root=os.path.realpath(root))
    else:
        yield _local_entry(root, os.path.basename(root), st)


def _outside(path: str, real_root: str) -> bool:
    """True when a link's target resolves outside the source folder (`..` and nested links included)."""
    target = os.path.realpath(path, strict=True)  # OSError on a loop or a dangling link: quarantined as such
    return os.path.commonpath([real_root, target]) != real_root


def _walk(
    root: str, rel_dir: str, cfg: IngestConfig, visited: set[tuple[int, int]], real_root: str
) -> Iterator[SourceFile]:
    folder = os.path.join(root, rel_dir) if rel_dir else root
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        yield _local_error(folder, rel_dir or ".", exc)
        return
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        full = entry.path
        try:
            is_link = entry.is_symlink()
            if is_link and cfg.follow_symlinks == "none":
                if selected(rel, cfg):
                    yield SourceFile(local_uri(full), _safe_text(rel), full, "file", error=(
                        "not_a_regular_file", "symlink not followed (follow_symlinks: none)"))
                continue
            # Checked before anything is read through the link, so `passwd.txt -> /etc/passwd` stays unread.
            if is_link and cfg.follow_symlinks == "inside" and _outside(full, real_root):
                if (not _dir_excluded(rel, cfg)) if entry.is_dir() else selected(rel, cfg):
                    yield SourceFile(local_uri(full), _safe_text(rel), full, "file", error=(
                        "symlink_outside_root",
                        "symlink target is outside the source folder; not read (follow_symlinks: inside)"))
                continue
            st = os.stat(full)  # follows symlinks; raises ELOOP on a loop
        except OSError as exc:
            if selected(rel, cfg):
                yield _local_error(full, rel, exc)
            continue
        if stat.S_ISDIR(st.st_mode):
            if _dir_excluded(rel, cfg):
                continue
            key = (st.st_dev, st.st_ino)
            if key in visited:
                yield SourceFile(local_uri(full), _safe_text(rel), full, "file", error=(
                    "symlink_loop", f"symlinked folder {_safe_text(rel)!r} leads back to a folder already read"))
                continue
            yield from _walk(root, rel, cfg, visited | {key}, real_root)
        elif selected(rel, cfg):
            yield _local_entry(full, rel, st)


def _local_entry(path: str, rel: str, st: os.stat_result) -> SourceFile:
    uri, rel = local_uri(path), _safe_text(rel)
    if not stat.S_ISREG(st.st_mode):
        return SourceFile(uri, rel, path, "file", error=(
            "not_a_regular_file", "not a regular file (FIFO, socket or device); only files are read"))
    return SourceFile(uri, rel, path, "file", size=st.st_size, mtime_ns=st.st_mtime_ns)


def _local_error(path: str, rel: str, exc: OSError) -> SourceFile:
    if exc.errno == errno.ELOOP:
        reason, msg = "symlink_loop", "symlink loop: the link resolves to itself; remove or fix it"
    elif exc.errno == errno.ENOENT:
        reason, msg = "unreadable", "broken symlink: its target does not exist"
    else:
        reason, msg = "unreadable", f"{exc.strerror or exc}; check the file's permissions"
    return SourceFile(local_uri(path), _safe_text(rel), path, "file", error=(reason, msg))


@functools.lru_cache(maxsize=16)
def filesystem(protocol: str) -> Any:
    """An fsspec filesystem for a protocol; S3 falls back to pyarrow's client when s3fs is absent."""
    import fsspec

    try:
        return fsspec.filesystem(protocol)
    except ImportError:
        if protocol not in ("s3", "s3a", "gs", "gcs", "hdfs"):
            raise
        import pyarrow.fs as pafs
        from fsspec.implementations.arrow import ArrowFSWrapper

        fs, _ = pafs.FileSystem.from_uri(f"{protocol}://")
        return ArrowFSWrapper(fs)


def _list_remote(source: str, cfg: IngestConfig) -> Iterator[SourceFile]:
    import fsspec

    protocol = source.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(source)
    except ImportError:
        fs = filesystem(protocol)
        root = source.split("://", 1)[1]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if not fs.exists(root):
        raise FileNotFoundError(f"ingest source {source!r} does not exist; check the URI and credentials")
    if fs.isdir(root):
        listing = fs.find(root, withdirs=False, detail=True)
        root_norm = root.rstrip("/")
        for name, info in sorted(listing.items()):
            rel = name[len(root_norm):].lstrip("/") if name.startswith(root_norm) else name
            if selected(rel, cfg):
                yield _remote_entry(fs, protocol, name, rel, info)
    else:
        info = fs.info(root)
        yield _remote_entry(fs, protocol, root, root.rsplit("/", 1)[-1], info)


def _remote_entry(fs: Any, protocol: str, name: str, rel: str, info: dict[str, Any]) -> SourceFile:
    uri = _safe_text(fs.unstrip_protocol(name))
    return SourceFile(uri, _safe_text(rel), name, protocol, size=int(info.get("size") or 0),
                      mtime_ns=_mtime_ns(info))


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return int(value.timestamp() * 1e9)
        try:
            return int(float(value) * 1e9)
        except (TypeError, ValueError):
            return abs(hash(str(value)))
    return -1


def open_source(sf: SourceFile):  # noqa: ANN201 (a binary file object)
    """Open a listed file for binary reading."""
    if sf.is_local:
        return open(sf.path, "rb")  # noqa: SIM115
    return filesystem(sf.protocol).open(sf.path, "rb")


# -- fingerprint -----------------------------------------------------------------------------


def source_digest(sources: list[str], cfg: IngestConfig) -> str:
    """A cheap fingerprint of what `run_ingest` would read: names, sizes, mtimes and the config.

    No file content is read, so it is cheap to compute every hour; the flow skips
    the stage when it equals the last manifest's `input_digest`.
    """
    files = list_sources(sources, cfg)
    return stable_hash(
        {
            "sources": [str(s) for s in sources],
            "files": [(f.uri, f.size, f.mtime_ns, f.error[0] if f.error else None) for f in files],
            "config": cfg.model_dump(mode="json"),
        }
    )
