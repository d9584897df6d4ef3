"""Zip and tar archives, walked in memory as folders: members are dispatched by name like files.

Never extracted to disk, so a `../` or absolute member can't land anywhere (it is
quarantined as `unsafe_path`). Records are numbered across all members (`#n`), and
`meta.member` names the member (`outer.zip/inner.txt` for nested archives).

An archive that trips a limit (`max_decompressed_bytes`, or more than `MAX_MEMBERS`
members in one archive) raises `decompression_limit` naming the limit and the member
where it tripped; the file guard then keeps nothing of it, so a bomb is one quarantine row.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError
from refinery.tasks.ingest.sources import glob_match
from refinery.tasks.ingest.watchdog import FileTimeout

MAX_DEPTH = 3  # archives inside archives inside archives
MAX_MEMBERS = 10_000  # files in one archive; with MAX_DEPTH and the byte budget this bounds the work


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


def _member_items(member: str, data: bytes, ctx: Context) -> Iterator[Item]:
    """Items of one archive member, with file-level errors turned into a Problem."""
    from refinery.tasks.ingest.formats import read_blob  # the registry imports this module

    ctx.depth += 1
    try:
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
        if isinstance(item, Doc):
            inner = item.meta.pop("member", None)  # a member of a nested archive: join the paths
            record = item.meta.pop("member_record", None) if inner else item.pos
            item.meta["member"] = f"{member}/{inner}" if inner else member
            if record is not None:
                item.meta["member_record"] = record
        else:
            item.error = f"member {member!r}: {item.error}"
        yield item


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
    yield from _number(_zip_items(data, ctx))


def _zip_items(data: bytes, ctx: Context) -> Iterator[Item]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
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
        yield from _member_items(name, member, ctx)


def read_tar(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    _enter(ctx)
    yield from _number(_tar_items(data, ctx))


def _tar_items(data: bytes, ctx: Context) -> Iterator[Item]:
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (tarfile.TarError, EOFError) as exc:
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
            if info.size > ctx.cfg.max_file_bytes:
                yield Problem("too_large", f"member {name!r} is {info.size} bytes, over max_file_bytes")
                continue
            f = tf.extractfile(info)
            try:
                member = _bounded_read(f, ctx.cfg.max_file_bytes, ctx) if f is not None else b""
            except ReadError as exc:
                if exc.reason == "decompression_limit":
                    raise _limit_at(name, exc) from None
                yield Problem(exc.reason, f"member {name!r}: {exc.message}")
                continue
            yield from _member_items(name, member, ctx)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ReadError("truncated" if isinstance(exc, EOFError | tarfile.ReadError) else "corrupt",
                        f"tar archive broken part-way: {exc}") from exc
    if not files:
        raise ReadError("no_records", "tar archive holds no files")


ZIP = Format("zip", read_zip, extensions={".zip"})
TAR = Format("tar", read_tar, extensions={".tar"})
