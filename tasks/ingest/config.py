"""Configuration of the ingest stage.

Every key has a default that works on a laptop; a bad value is rejected by
pydantic with a message that names the key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# `inside`: follow a link only when its target resolves inside the source folder it was found in.
SymlinkPolicy = Literal["inside", "all", "none"]

DEFAULT_EXCLUDE = [
    ".*",  # hidden files at the top of a source
    "**/.*",  # hidden files anywhere
    "**/.*/**",  # anything inside a hidden folder (.git, .venv, ...)
    "**/__pycache__/**",
    "**/node_modules/**",
    "**/*.pyc",
    "**/~$*",  # office lock files
]


class IngestConfig(BaseModel):
    """What to read, how much of it, and how long to try."""

    model_config = ConfigDict(extra="forbid")

    include: list[str] = Field(
        default_factory=lambda: ["**/*"],
        description="Glob patterns, relative to each source folder, of files to read.",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="Glob patterns of files to leave out (wins over include).",
    )
    max_file_bytes: int = Field(
        default=100 * 2**20, gt=0, description="Files larger than this are quarantined as `too_large`."
    )
    max_decompressed_bytes: int = Field(
        default=2**30,
        gt=0,
        description="Bound on the bytes one gzip/zstd stream or archive may expand to (zip bombs).",
    )
    file_timeout_s: float = Field(
        default=60.0, gt=0, description="Per-file parse limit; a slower file is quarantined as `timeout`."
    )
    jsonl_text_field: str = Field(default="text", min_length=1, description="JSON key holding the text.")
    parquet_text_column: str = Field(
        default="text", min_length=1, description="Column holding the text in Parquet/Arrow datasets."
    )
    ocr: bool = Field(default=True, description="OCR images and PDFs without a text layer with Tesseract.")
    tesseract_cmd: str = Field(default="tesseract", min_length=1, description="Tesseract executable.")
    ocr_lang: str = Field(default="eng", min_length=1, description="Tesseract language(s), e.g. `eng+deu`.")
    office_reader: Literal["direct", "unstructured"] = Field(
        default="direct",
        description="DOCX/PPTX reader: python-docx/python-pptx directly (fast), or unstructured's partitioners.",
    )
    workers: int = Field(
        default=2,
        ge=1,
        description="Parse processes started when no executor is passed; 1 parses in-process.",
    )
    batch_files: int = Field(default=64, ge=1, description="Files per parse batch.")
    batch_bytes: int = Field(default=64 * 2**20, gt=0, description="Raw bytes per parse batch.")
    follow_symlinks: SymlinkPolicy = Field(
        default="inside",
        description=(
            "Which symlinks to follow: `inside` (targets within the source folder), `all` or `none`."
            " A link not followed is quarantined, never read; loops are quarantined. `true`/`false` mean"
            " `inside`/`none`."
        ),
    )

    @field_validator("follow_symlinks", mode="before")
    @classmethod
    def _bool_policy(cls, value: Any) -> Any:
        """Older configs say `true`/`false`; `true` now means `inside`, so no link pulls in `/etc/passwd`."""
        if isinstance(value, bool):
            return "inside" if value else "none"
        return value
