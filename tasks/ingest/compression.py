"""Compression suffixes, peeled before a format is chosen: `x.jsonl.gz` is read as `x.jsonl`.

Decompression charges every byte it produces to the file's `max_decompressed_bytes`
budget, so a bomb stops at the limit instead of filling memory.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from typing import Any

from refinery.tasks.ingest.base import Context, ReadError, split_name

COMPRESSION = {".gz": "gzip", ".tgz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}


def peel(name: str, data: bytes, ctx: Context) -> tuple[str, bytes] | None:
    """(inner name, decompressed bytes) when `name` ends in a compression suffix, else None."""
    _, ext = split_name(name)
    if ext not in COMPRESSION:
        return None
    inner = name[: -len(ext)] + (".tar" if ext == ".tgz" else "")
    return inner, decompress(data, COMPRESSION[ext], ctx)


def decompress(data: bytes, method: str, ctx: Context) -> bytes:
    """Decompress with a running bound, so a bomb stops at the limit instead of filling memory."""
    if method == "gzip":
        stream: Any = gzip.GzipFile(fileobj=io.BytesIO(data))
    elif method == "bz2":
        stream = bz2.BZ2File(io.BytesIO(data))
    elif method == "xz":
        stream = lzma.LZMAFile(io.BytesIO(data))
    else:
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = bytearray()
    try:
        while chunk := stream.read(1 << 20):
            ctx.charge(len(chunk))
            out += chunk
    except ReadError:  # the decompression limit (ctx.charge): keep its own reason, not "corrupt"
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
        truncated = isinstance(exc, EOFError) or "end-of-stream" in str(exc) or "premature" in str(exc).lower()
        reason = "truncated" if truncated else "corrupt"
        raise ReadError(reason, f"{method} stream: {exc}") from exc
    except Exception as exc:  # zstandard.ZstdError has no common base with the above
        raise ReadError("corrupt", f"{method} stream: {exc}") from exc
    if method == "zstd":
        _check_zstd_complete(data, len(out))
    return bytes(out)


def _check_zstd_complete(data: bytes, produced: int) -> None:
    """zstd's stream reader stops quietly at a cut; compare with the size the frame declares."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ReadError("corrupt", f"zstd stream: {exc}") from exc
    if produced == 0 or 0 <= produced < declared:
        raise ReadError("truncated", f"zstd stream: ends early ({produced} of {max(declared, 0)} bytes)")


# -- streaming (dataset files) ----------------------------------------------------------------

MAX_RATIO = 100
"""A dataset stream is a bomb when it passes `max_decompressed_bytes` *and* has expanded more than this
many times the compressed bytes read so far: real JSONL compresses 3-10x, a bomb ~1000x. Big honest
dumps stream past the byte bound; a bomb is still named as one."""


class CountingReader(io.RawIOBase):
    """A raw stream that counts (and, given a `hasher`, hashes) the bytes read through it, and tells that
    count as its position: the compressed side of a ratio, a planner's scan that doubles as the file's
    hash, a stream that cannot seek handed to a reader that asks where it is."""

    def __init__(self, raw: Any, hasher: Any = None) -> None:
        self.raw = raw
        self.hasher = hasher
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        if self.hasher is not None:
            self.hasher.update(data)
        self.count += n
        return n

    def tell(self) -> int:
        return self.count


class Decompressed(io.RawIOBase):
    """A decompressing stream with errors as `ReadError`s and a bomb guard (see MAX_RATIO).

    `produced` counts the decompressed bytes so far; a cut zstd stream (which the library
    ends quietly) is `truncated` against the size its frame declares.
    """

    def __init__(self, raw: Any, method: str, max_bytes: int) -> None:
        self.method = method
        self.max_bytes = max_bytes
        self.produced = 0
        self._declared = -1
        if method == "zstd" and raw.seekable():
            import zstandard

            head = raw.read(18)
            try:
                self._declared = zstandard.frame_content_size(head) if head else 0
            except zstandard.ZstdError as exc:
                raise ReadError("corrupt", f"zstd stream: {exc}") from exc
            raw.seek(0)
        self._raw = CountingReader(raw)
        if method == "gzip":
            self._inner: Any = gzip.GzipFile(fileobj=self._raw)
        elif method == "bz2":
            self._inner = bz2.BZ2File(self._raw)
        elif method == "xz":
            self._inner = lzma.LZMAFile(self._raw)
        else:
            import zstandard

            self._inner = zstandard.ZstdDecompressor().stream_reader(self._raw, read_across_frames=True)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self._inner.read(len(b))
        except ReadError:
            raise
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
            truncated = isinstance(exc, EOFError) or "end-of-stream" in str(exc) or "premature" in str(exc).lower()
            raise ReadError("truncated" if truncated else "corrupt",
                            f"{self.method} stream broken after {self.produced} bytes: {exc}") from exc
        except Exception as exc:  # zstandard.ZstdError has no common base with the above
            raise ReadError("corrupt", f"{self.method} stream broken after {self.produced} bytes: {exc}") from exc
        n = len(data)
        b[:n] = data
        self.produced += n
        if self.produced > self.max_bytes and self.produced > MAX_RATIO * max(self._raw.count, 1):
            raise ReadError(
                "decompression_limit",
                f"expands past max_decompressed_bytes={self.max_bytes} at over {MAX_RATIO}x its compressed size "
                "(a decompression bomb)",
            )
        if n == 0 and self.method == "zstd" and (self.produced == 0 or 0 <= self.produced < self._declared):
            raise ReadError("truncated",
                            f"zstd stream: ends early ({self.produced} of {max(self._declared, 0)} bytes)")
        return n


def open_stream(name: str, raw: Any, max_bytes: int) -> tuple[str, Any]:
    """(inner name, buffered binary stream): `raw` decompressed by its name's suffixes, layer by layer."""
    while True:
        _, ext = split_name(name)
        if ext not in COMPRESSION or ext == ".tgz":
            return name, raw
        name = name[: -len(ext)]
        raw = io.BufferedReader(Decompressed(raw, COMPRESSION[ext], max_bytes), buffer_size=1 << 20)
