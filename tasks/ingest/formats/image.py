"""Images, OCRed with the Tesseract CLI (stdin to stdout): no Python binding to install.

Tesseract and poppler run as subprocesses with the file's remaining time as their
timeout (the watchdog can't interrupt a child process); the PDF reader OCRs pages
without a text layer with the same helpers.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

from refinery.tasks.ingest.base import Context, Doc, Format, Item, ReadError
from refinery.tasks.ingest.config import IngestConfig
from refinery.tasks.ingest.watchdog import FileTimeout


def ocr_status(cfg: IngestConfig) -> tuple[bool, str]:
    """(available, why not): whether image files can be OCRed with this config."""
    if not cfg.ocr:
        return False, "ocr is off in the ingest config; set `ocr: true` (and install Tesseract) to read images"
    if not shutil.which(cfg.tesseract_cmd):
        return False, (
            f"Tesseract ({cfg.tesseract_cmd!r}) is not installed, so images can't be OCRed: install it "
            "(Debian/Ubuntu: apt-get install tesseract-ocr; macOS: brew install tesseract) or set "
            "`tesseract_cmd` to its path; set `ocr: false` to quarantine images as `ocr_disabled`"
        )
    return True, ""


def read_image(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    ok, why = ocr_status(ctx.cfg)
    if not ok:
        raise ReadError("ocr_disabled" if not ctx.cfg.ocr else "ocr_unavailable", why)
    text = tesseract(data, ctx)
    if not text.strip():
        raise ReadError("no_text", "OCR found no text in the image")
    yield Doc(text.strip(), "image", len(data), {"ocr": "tesseract", "ocr_lang": ctx.cfg.ocr_lang})


def tesseract(image: bytes, ctx: Context) -> str:
    """The text Tesseract reads in one image."""
    out = run_tool([ctx.cfg.tesseract_cmd, "stdin", "stdout", "-l", ctx.cfg.ocr_lang], image, ctx, "tesseract")
    return out.decode("utf-8", errors="replace")


def run_tool(cmd: list[str], stdin: bytes, ctx: Context, what: str) -> bytes:
    """stdout of an external tool, within the file's remaining time; a failure is `corrupt`."""
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=ctx.remaining_s(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise FileTimeout(f"{what} ran past file_timeout_s") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ReadError("corrupt", f"{what} failed: {err[-1] if err else f'exit code {proc.returncode}'}")
    return proc.stdout


IMAGE = Format("image", read_image, extensions={".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pnm"})
