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
