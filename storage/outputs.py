"""Typed stage outputs: what a completed stage hands to the stages that read it.

Each is rebuilt from the stage's folder and its manifest, so a stage run in
this flow and one completed in an earlier run look the same to their readers.
The stage graph (flows/stages.py) names the output type of every stage; the
Prefect task of a stage returns it, and the tasks that read it receive it, so
Prefect's task graph is the data graph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from typing_extensions import Self

from refinery.storage.documents import document_files
from refinery.storage.manifest import Manifest, read_manifest


class StageOutput(BaseModel):
    """Any completed stage: its folder, its lineage key and its counts."""

    stage: str
    dir: Path
    digest: str  # the manifest's output digest: the lineage key readers record as their input
    documents: int  # documents kept by the stage
    metrics: dict[str, float] = {}

    @classmethod
    def from_manifest(cls, stage_dir: str | os.PathLike[str], manifest: Manifest) -> Self:
        stage_dir = Path(stage_dir)
        return cls(
            stage=manifest.stage, dir=stage_dir, digest=manifest.output_digest, documents=manifest.counts.kept,
            metrics=manifest.metrics, **cls._fields(stage_dir, manifest),
        )

    @classmethod
    def read(cls, stage_dir: str | os.PathLike[str]) -> Self | None:
        """The output of the stage completed in `stage_dir`, or None if it never completed there."""
        manifest = read_manifest(stage_dir)
        return None if manifest is None else cls.from_manifest(stage_dir, manifest)

    @classmethod
    def _fields(cls, stage_dir: Path, manifest: Manifest) -> dict[str, Any]:
        """The type's own fields, from the folder and the manifest's `extra`."""
        return {}


class Documents(StageOutput):
    """A documents table: Parquet parts in order (ingest, dedup, filter, and any stage of the same kind)."""

    files: list[Path]

    @classmethod
    def _fields(cls, stage_dir: Path, manifest: Manifest) -> dict[str, Any]:
        return {"files": document_files(stage_dir)}


class TokenizerFile(StageOutput):
    """A Hugging Face `tokenizer.json` with its vocabulary size and end-of-text id."""

    file: Path
    vocab_size: int
    eot_id: int

    @classmethod
    def _fields(cls, stage_dir: Path, manifest: Manifest) -> dict[str, Any]:
        extra = manifest.extra
        return {
            "file": stage_dir / extra.get("tokenizer_file", "tokenizer.json"),
            "vocab_size": int(extra["vocab_size"]),
            "eot_id": int(extra["eot_id"]),
        }


class Shards(StageOutput):
    """Memory-mappable token shards, split into train and validation, with their sizes."""

    train_files: list[Path]
    val_files: list[Path]
    vocab_size: int
    eot_id: int
    train_tokens: int
    val_tokens: int
    train_bytes: int
    val_bytes: int

    @classmethod
    def _fields(cls, stage_dir: Path, manifest: Manifest) -> dict[str, Any]:
        extra = manifest.extra
        return {
            "train_files": [stage_dir / f for f in extra.get("train_files", [])],
            "val_files": [stage_dir / f for f in extra.get("val_files", [])],
            **{k: int(extra.get(k, 0)) for k in ("vocab_size", "eot_id", "train_tokens", "val_tokens",
                                                 "train_bytes", "val_bytes")},
        }


class Checkpoint(StageOutput):
    """A trained model's checkpoint folder (safetensors weights and JSON config), with its curves."""

    checkpoint_dir: Path
    loss_curve: Path | None = None

    @classmethod
    def _fields(cls, stage_dir: Path, manifest: Manifest) -> dict[str, Any]:
        extra = manifest.extra
        curve = extra.get("loss_curve")
        return {"checkpoint_dir": stage_dir / extra["checkpoint_dir"], "loss_curve": stage_dir / curve if curve else None}


class Evaluation(StageOutput):
    """Evaluation metrics (validation loss, bits per byte, the unigram baseline) and sample generations."""

    samples: list[Any] = []

    @classmethod
    def _fields(cls, stage_dir: Path, manifest: Manifest) -> dict[str, Any]:
        return {"samples": list(manifest.extra.get("samples", []))}
