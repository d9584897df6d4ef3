"""Zip and tar archives, walked as folders: members are dispatched by name like files.

An archive file is read from its open file, never whole: a tar (plain or compressed) is walked
as a stream, member after member (`tarfile` mode `r|*`), a zip through its central directory.
A member that is a dataset is read record by record through the reader a standalone file of its
kind uses, with the same per-record limits and quarantine rows, and is not held to `max_file_bytes`:
JSON Lines, JSON and WARC (optionally compressed) are streamed straight from the member; Parquet,
Arrow IPC and CSV/TSV, whose readers seek or read twice, are first copied ("spooled") in 1 MiB
chunks to a temporary file in the system temp dir, deleted as soon as the member is done (on error
too). Any other member is read into memory (at most `max_file_bytes`) and parsed under
`file_timeout_s`. An archive inside an archive is read from its bytes, members and all.

Never extracted to disk under a member's name, so a `../` or absolute member can't land anywhere
(it is quarantined as `unsafe_path`). Records are numbered across all members (`#n`), and
`meta.member` names the member (`outer.zip/inner.txt` for nested archives).

An archive that trips a limit (`max_decompressed_bytes`, which every member's bytes are
charged to as they are read, spooled ones included, so a spool file never outgrows it; or more
than `MAX_MEMBERS` members in one archive) raises `decompression_limit` naming the limit and the
member where it tripped; nothing of it is kept, so a bomb is one quarantine row.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError, Rows
from refinery.tasks.ingest.compression import open_stream
from refinery.tasks.ingest.sources import glob_match
from refinery.tasks.ingest.watchdog import FileTimeout, time_limit

MAX_DEPTH = 3  # archives inside archives inside archives
MAX_MEMBERS = 10_000  # files in one archive; with MAX_DEPTH and the byte budget this bounds the work
STREAMED_MEMBERS = frozenset({"jsonl", "json", "warc"})  # dataset kinds read from a member as a stream
SPOOLED_MEMBERS = frozenset({"parquet", "arrow", "csv"})  # dataset kinds read from a temporary copy of the member
SPOOL_CHUNK = 1 << 20  # bytes copied at once from a member to its temporary file


class ArchiveLimit(ReadError):
    """`decompression_limit` raised inside an archive: `limit` says which, `member` where (a path for nested ones)."""

    def __init__(self, limit: str, member: str) -> None:
        super().__init__("decompression_limit", f"{limit} (tripped at member {member!r})")
        self.limit = limit
        self.member = member


def _limit_at(member: str, exc: ReadError) -> ArchiveLimit:
    """The limit `exc` reports, located at `member` (joined to the inner path when it tripped in a nested archive)."""
    if isinstance(exc, ArchiveLimit):
        return ArchiveLimit(exc.limit, f"{member}/{exc.member}")
    return ArchiveLimit(exc.message, member)


def _count(n: int, member: str) -> None:
    """Refuse the member past MAX_MEMBERS: an archive of countless tiny files is a bomb too."""
    if n > MAX_MEMBERS:
        raise ArchiveLimit(f"holds more than MAX_MEMBERS={MAX_MEMBERS} members (a zip bomb, or split the archive)",
                           member)


def unsafe_member(name: str) -> bool:
    """True for names that would land outside the folder they're extracted to."""
    norm = name.replace("\\", "/")
    return norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) is not None or ".." in norm.split("/")


def _enter(ctx: Context) -> None:
    if ctx.depth >= MAX_DEPTH:
        raise ReadError("unsupported_format", f"archive nested deeper than {MAX_DEPTH} levels")


def _member_items(member: str, data: bytes, ctx: Context, guard: bool = False) -> Iterator[Item]:
    """Items of one archive member, with file-level errors turned into a Problem.

    `guard`: parse under `file_timeout_s` of its own (a member of an archive read as a stream;
    an archive read whole is under its file's time limit already).
    """
    from refinery.tasks.ingest.formats import read_blob  # the registry imports this module

    ctx.depth += 1
    try:
        if guard:
            try:
                with time_limit(ctx.cfg.file_timeout_s):
                    items = list(read_blob(member, data, ctx))
            except FileTimeout:
                why = f"parsing took longer than file_timeout_s={ctx.cfg.file_timeout_s}"
                items = [Problem("timeout", why)]
        else:
            items = list(read_blob(member, data, ctx))
    except ReadError as exc:
        if exc.reason == "decompression_limit":
            raise _limit_at(member, exc) from None
        items = [Problem(exc.reason, exc.message)]
    except (FileTimeout, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (one bad member must not lose its siblings)
        items = [Problem("parse_error", f"{type(exc).__name__}: {exc}")]
    finally:
        ctx.depth -= 1
    if not items:
        items = [Problem("no_records", "member holds no records")]
    for item in items:
        yield _in_member(member, item)


def _in_member(member: str, item: Item) -> Item:
    """An item of a member, saying so: `meta.member` (joined for nested archives), or the error prefixed."""
    if isinstance(item, Doc):
        inner = item.meta.pop("member", None)  # a member of a nested archive: join the paths
        record = item.meta.pop("member_record", None) if inner else item.pos
        item.meta["member"] = f"{member}/{inner}" if inner else member
        if record is not None:
            item.meta["member_record"] = record
    else:
        item.error = f"member {member!r}: {item.error}"
    return item


class _Charged(io.RawIOBase):
    """A member's bytes as they are read, each charged to the archive's `max_decompressed_bytes` budget."""

    def __init__(self, f: Any, ctx: Context) -> None:
        self.f = f
        self.ctx = ctx

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        n = len(data)
        self.ctx.charge(n)
        b[:n] = data
        return n


def _streamed_kind(member: str) -> str | None:
    """The dataset kind of a member read record by record (streamed or spooled), None for members read whole."""
    from refinery.tasks.ingest.units import dataset_kind  # units imports the format registry

    kind = dataset_kind(member)
    return kind if kind in STREAMED_MEMBERS | SPOOLED_MEMBERS else None


def _spool(f: BinaryIO, ctx: Context) -> str:
    """Copy a member to a temporary file, chunk by chunk, each charged before it is written; its path.

    The file is removed here if the copy fails; otherwise the caller removes it.
    """
    fd, path = tempfile.mkstemp(prefix="refinery-member-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := f.read(SPOOL_CHUNK):
                ctx.charge(len(chunk))  # a bomb stops here, before its bytes reach the disk
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise ReadError("unreadable", f"member could not be copied to a temporary file in "
                                                  f"{tempfile.gettempdir()}: {exc.strerror or exc}") from exc
    except BaseException:
        os.unlink(path)
        raise
    return path


def _spooled_items(member: str, kind: str, f: BinaryIO, ctx: Context) -> Iterator[Item | Rows]:
    """A Parquet, Arrow IPC or CSV member read, as the standalone file would be, from its temporary copy."""
    import pyarrow as pa

    from refinery.tasks.ingest.formats.parquet import stream_arrow, stream_parquet
    from refinery.tasks.ingest.formats.tabular import stream_csv

    path = _spool(f, ctx)
    try:
        if kind == "parquet":
            with pa.OSFile(path) as source:
                yield from stream_parquet(source, ctx)
        elif kind == "arrow":
            with pa.OSFile(path) as source:
                yield from stream_arrow(source, ctx)
        else:
            opened: list[BinaryIO] = []

            def opener() -> BinaryIO:
                raw = open(path, "rb")  # noqa: SIM115 (closed below, after the reader's last pass)
                opened.append(raw)
                return open_stream(member, raw, ctx.cfg.max_decompressed_bytes)[1]  # a .csv.gz as on its own

            try:
                yield from stream_csv(member, opener, ctx)
            finally:
                for raw in opened:
                    raw.close()
    finally:
        os.unlink(path)


def _streamed_member(member: str, kind: str, f: BinaryIO, ctx: Context) -> Iterator[Item]:
    """A dataset member read through its reader: one record at a time, never the member whole in memory."""
    from refinery.tasks.ingest.formats.jsonl import stream_json, stream_jsonl
    from refinery.tasks.ingest.formats.warc import read_warc_stream

    count = 0
    items: Iterator[Item | Rows] = iter(())
    try:
        if kind in SPOOLED_MEMBERS:
            items = _spooled_items(member, kind, f, ctx)
        else:
            charged = io.BufferedReader(_Charged(f, ctx), 1 << 20)
            inner, stream = open_stream(member, charged, ctx.cfg.max_decompressed_bytes)
            if kind == "jsonl":
                items = stream_jsonl(stream, ctx)
            elif kind == "json":
                items = stream_json(stream, ctx)
            else:
                items = read_warc_stream(inner, stream, ctx)
        for item in items:
            for one in item.docs() if isinstance(item, Rows) else (item,):
                count += 1
                yield _in_member(member, one)
    except ReadError as exc:
        if exc.reason == "decompression_limit":
            raise _limit_at(member, exc) from None
        count += 1
        yield _in_member(member, Problem(exc.reason, exc.message))
    except (FileTimeout, MemoryError):
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error):
        raise  # the archive itself is broken: its reader says so
    except Exception as exc:  # noqa: BLE001 (one bad member must not lose its siblings)
        count += 1
        yield _in_member(member, Problem("parse_error", f"{type(exc).__name__}: {exc}"))
    finally:
        close = getattr(items, "close", None)
        if close is not None:  # left part-way (the archive's reader stopped): a spooled member's file goes now
            close()
    if not count:
        yield _in_member(member, Problem("no_records", "member holds no records"))


def _bounded_read(f: Any, limit: int, ctx: Context) -> bytes:
    out = bytearray()
    while chunk := f.read(1 << 20):
        ctx.charge(len(chunk))
        out += chunk
        if len(out) > limit:
            raise ReadError("too_large", f"member larger than max_file_bytes={limit}")
    return bytes(out)


def _number(items: Iterator[Item]) -> Iterator[Item]:
    """Give every item in an archive its running position (`#n` across all members)."""
    for n, item in enumerate(items):
        item.pos = n
        yield item


def read_zip(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    _enter(ctx)
    yield from _number(_zip_items(io.BytesIO(data), ctx))


def _zip_items(f: BinaryIO, ctx: Context, streamed: bool = False) -> Iterator[Item]:
    """Members of a zip (`f` seekable); `streamed`: datasets read as streams, the rest under a time limit."""
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise ReadError("corrupt", f"unreadable zip archive: {exc}") from exc
    files = [i for i in infos if not i.is_dir()]
    if not files:
        raise ReadError("no_records", "zip archive holds no files")
    if len(files) > MAX_MEMBERS:  # the central directory says so up front: refuse before reading any
        _count(len(files), files[MAX_MEMBERS].filename)
    for info in files:
        name = info.filename
        if unsafe_member(name):
            yield Problem("unsafe_path", f"member {name!r} points outside the archive folder; not read")
            continue
        if glob_match(name, ctx.cfg.exclude):
            continue
        if info.flag_bits & 0x1:
            yield Problem("encrypted", f"member {name!r} is encrypted")
            continue
        kind = _streamed_kind(name) if streamed and info.file_size else None
        if kind is not None:
            try:
                with zf.open(info) as member_file:
                    yield from _streamed_member(name, kind, member_file, ctx)
            except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, OSError) as exc:
                yield Problem("corrupt", f"member {name!r}: {exc}")
            continue
        try:
            with zf.open(info) as f:
                member = _bounded_read(f, ctx.cfg.max_file_bytes, ctx)
        except ReadError as exc:
            if exc.reason == "decompression_limit":
                raise _limit_at(name, exc) from None
            yield Problem(exc.reason, f"member {name!r}: {exc.message}")
            continue
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, OSError) as exc:
            yield Problem("corrupt", f"member {name!r}: {exc}")
            continue
        yield from _member_items(name, member, ctx, guard=streamed)


def read_tar(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    _enter(ctx)
    yield from _number(_tar_items(io.BytesIO(data), ctx))


def _tar_items(f: BinaryIO, ctx: Context, streamed: bool = False) -> Iterator[Item]:
    """Members of a tar walked as a stream (`r|*`: plain, gzip, bz2 or xz); `streamed` as for zips."""
    try:
        tf = tarfile.open(fileobj=f, mode="r|*")
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ReadError("corrupt", f"unreadable tar archive: {exc}") from exc
    files = 0
    try:
        for info in tf:
            name = info.name
            if info.isdir():
                continue
            files += 1
            _count(files, name)
            if unsafe_member(name) or (info.issym() or info.islnk()) and unsafe_member(info.linkname or ".."):
                yield Problem("unsafe_path", f"member {name!r} points outside the archive folder; not read")
                continue
            if glob_match(name, ctx.cfg.exclude):
                continue
            if not info.isfile():
                yield Problem("not_a_regular_file", f"member {name!r} is a link or device; not read")
                continue
            kind = _streamed_kind(name) if streamed and info.size else None
            if kind is None and info.size > ctx.cfg.max_file_bytes:
                yield Problem("too_large", f"member {name!r} is {info.size} bytes, over max_file_bytes")
                continue
            member_file = tf.extractfile(info)
            if kind is not None and member_file is not None:
                yield from _streamed_member(name, kind, member_file, ctx)
                continue
            try:
                limit = ctx.cfg.max_file_bytes
                member = _bounded_read(member_file, limit, ctx) if member_file is not None else b""
            except ReadError as exc:
                if exc.reason == "decompression_limit":
                    raise _limit_at(name, exc) from None
                yield Problem(exc.reason, f"member {name!r}: {exc.message}")
                continue
            yield from _member_items(name, member, ctx, guard=streamed)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ReadError("truncated" if isinstance(exc, EOFError | tarfile.ReadError) else "corrupt",
                        f"tar archive broken part-way: {exc}") from exc
    if not files:
        raise ReadError("no_records", "tar archive holds no files")


def stream_archive(name: str, raw: BinaryIO, ctx: Context) -> Iterator[Item]:
    """An archive from its open file (seekable, for a zip): see the module's docstring."""
    _enter(ctx)
    if name.lower().endswith(".zip"):
        yield from _number(_zip_items(raw, ctx, streamed=True))
        return
    _, stream = open_stream(name, raw, ctx.cfg.max_decompressed_bytes)  # .tar.zst...; `r|*` does .tgz
    yield from _number(_tar_items(stream, ctx, streamed=True))


ZIP = Format("zip", read_zip, extensions={".zip"})
TAR = Format("tar", read_tar, extensions={".tar"})
