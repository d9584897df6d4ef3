"""Configuration of the ingest stage.

Every key has a default that works on a laptop; a bad value is rejected by
pydantic with a message that names the key.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


TEXT_FIELD_CANDIDATES = ("text", "content", "raw_content")  # tried in order when `text_field` is unset
META_VALUE_CHARS = 512  # longest string value kept in `meta` when `meta_fields` is unset


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
    html_extractor: Literal["trafilatura", "resiliparse", "heuristic"] = Field(
        default="trafilatura",
        description="HTML files to main text: trafilatura (best on the held-out pages), resiliparse (about ten "
        "times faster), or the former lxml rules (`heuristic`).",
    )
    warc_extractor: Literal["trafilatura", "resiliparse", "heuristic"] = Field(
        default="resiliparse",
        description="WARC responses to main text; resiliparse by default because crawl archives are large.",
    )
    max_record_bytes: int = Field(
        default=64 * 2**20,
        gt=0,
        description=(
            "Bound on one record of a dataset file (a JSON line, a Parquet/Arrow/CSV row, a WARC response);"
            " a larger record is quarantined as `too_large` by its number and the rest of the file goes on."
        ),
    )
    text_field: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "JSON key or column holding the text in dataset files; unset: the first of "
            f"{', '.join(TEXT_FIELD_CANDIDATES)} that is present."
        ),
    )
    meta_fields: list[str] | None = Field(
        default=None,
        description=(
            "Dataset fields copied into `meta`; unset: every short scalar field (strings up to"
            f" {META_VALUE_CHARS} characters, numbers, booleans, dates) such as url, id, language, dump, score."
        ),
    )
    jsonl_text_field: str | None = Field(
        default=None, min_length=1, description="Deprecated alias of `text_field`, for JSON Lines only."
    )
    parquet_text_column: str | None = Field(
        default=None, min_length=1, description="Deprecated alias of `text_field`, for Parquet/Arrow/CSV only."
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
    batch_bytes: int = Field(
        default=64 * 2**20,
        gt=0,
        description="Raw bytes per parse batch; a larger dataset file is split into work units of about this size.",
    )
    units_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Work units submitted and not yet collected; unset: two per worker. Bounds memory and spill disk.",
    )
    follow_symlinks: SymlinkPolicy = Field(
        default="inside",
        description=(
            "Which symlinks to follow: `inside` (targets within the source folder), `all` or `none`."
            " A link not followed is quarantined, never read; loops are quarantined. `true`/`false` mean"
            " `inside`/`none`."
        ),
    )

    def text_field_for(self, kind: str) -> str | None:
        """The configured text field for a dataset kind (`jsonl`, `parquet`, ...), None to detect it."""
        alias = self.jsonl_text_field if kind in ("jsonl", "json") else self.parquet_text_column
        return self.text_field or alias

    @model_validator(mode="after")
    def _deprecated_aliases(self) -> IngestConfig:
        for old in ("jsonl_text_field", "parquet_text_column"):
            if getattr(self, old) is not None:
                warnings.warn(f"ingest.{old} is deprecated; use ingest.text_field", DeprecationWarning, stacklevel=2)
        return self

    @field_validator("follow_symlinks", mode="before")
    @classmethod
    def _bool_policy(cls, value: Any) -> Any:
        """Older configs say `true`/`false`; `true` now means `inside`, so no link pulls in `/etc/passwd`."""
        if isinstance(value, bool):
            return "inside" if value else "none"
        return value
