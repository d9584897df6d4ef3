"""Stage manifests: the record that a stage completed, and the lineage key.

A stage writes `manifest.json` last, by atomic rename, so its presence means the
stage finished. `output_digest` is a hash over the stage's output files'
checksums and counts; the next stage records it as its `input_digest`, which
makes the chain from raw files to model checkable link by link.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refinery import __version__
from refinery.storage.atomic import atomic_write_json

MANIFEST_NAME = "manifest.json"


class OutputFile(BaseModel):
    """One file a stage wrote, relative to the stage directory."""

    path: str
    rows: int = 0
    bytes: int = 0
    sha256: str


class Counts(BaseModel):
    """Documents in, kept and dropped (by reason). `in == kept + sum(dropped)`."""

    model_config = ConfigDict(populate_by_name=True)

    in_: int = Field(alias="in")
    kept: int
    dropped: dict[str, int] = Field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def check(self, stage: str) -> None:
        """Raise if documents were lost or invented: nothing goes missing silently."""
        if self.in_ != self.kept + self.dropped_total:
            raise ValueError(
                f"stage {stage!r}: counts do not add up: in={self.in_} but "
                f"kept={self.kept} + dropped={self.dropped_total} ({self.dropped})"
            )


class StageResult(BaseModel):
    """What a stage function returns; the flow turns it into a manifest."""

    outputs: list[OutputFile]
    counts: Counts
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    stage: str
    config: dict[str, Any]
    config_hash: str
    input_digest: str
    output_digest: str
    outputs: list[OutputFile]
    counts: Counts
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    code_version: str = __version__
    created_at: float = Field(default_factory=time.time)

    def matches(self, input_digest: str, config_hash: str) -> bool:
        return self.input_digest == input_digest and self.config_hash == config_hash


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys, no whitespace)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def config_hash(config: BaseModel | dict[str, Any]) -> str:
    return stable_hash(config)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_file(stage_dir: Path, path: Path, rows: int = 0) -> OutputFile:
    """Checksum and size of an output file, for the manifest."""
    return OutputFile(
        path=str(Path(path).relative_to(stage_dir)),
        rows=rows,
        bytes=Path(path).stat().st_size,
        sha256=file_sha256(path),
    )


def output_digest(outputs: list[OutputFile], counts: Counts, input_digest: str, code_version: str) -> str:
    """The lineage key of a stage's outputs: content checksums, counts, the input's key and the code version.

    Folding the input digest in makes the keys a hash chain: a stage that needs
    data from two stages back (the shards stage reads the curated documents and
    the tokenizer) depends on them through its single `input_digest`, and a
    config change that leaves a stage's output bytes unchanged does not
    invalidate anything downstream. The stage's code version is folded in too:
    new stage code re-runs that stage and everything after it, whatever bytes it
    happens to write.
    """
    return stable_hash(
        {
            "input": input_digest,
            "outputs": sorted((o.path, o.sha256) for o in outputs),
            "counts": counts.model_dump(by_alias=True),
            "code": code_version,
        }
    )


def build_manifest(
    stage: str,
    config: BaseModel,
    input_digest: str,
    result: StageResult,
    timings: dict[str, float],
    code_version: str = __version__,
) -> Manifest:
    result.counts.check(stage)
    return Manifest(
        stage=stage,
        config=config.model_dump(mode="json"),
        config_hash=config_hash(config),
        input_digest=input_digest,
        output_digest=output_digest(result.outputs, result.counts, input_digest, code_version),
        outputs=result.outputs,
        counts=result.counts,
        metrics=result.metrics,
        extra=result.extra,
        timings=timings,
        code_version=code_version,
    )


def write_manifest(stage_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    target = Path(stage_dir) / MANIFEST_NAME
    atomic_write_json(target, manifest.model_dump(mode="json", by_alias=True))
    return target


class ManifestError(ValueError):
    """A stage's `manifest.json` that can't be read back (edited by hand, damaged): says which file and what to do."""


def read_manifest(stage_dir: str | os.PathLike[str]) -> Manifest | None:
    """The stage's manifest, or None if the stage never completed there.

    Raises `ManifestError` naming the file when it is not a valid manifest, so the
    command line can print one line instead of pydantic's traceback.
    """
    path = Path(stage_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        summary = f"{where + ': ' if where else ''}{first['msg']}"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ManifestError(
            f"{path} is not a valid stage manifest: {summary}{more}. It was edited or damaged; "
            f"restore it, or delete it and `refinery run` re-runs the {Path(stage_dir).name} stage"
        ) from None


def verify_outputs(stage_dir: str | os.PathLike[str], manifest: Manifest, check_sha256: bool = False) -> bool:
    """True if every output the manifest lists is present with its recorded size (and sha256, if asked).

    Sizes catch truncation and deletion for free; the streamed sha256 also
    catches a file changed in place at the same size, at the cost of reading it.
    """
    stage_dir = Path(stage_dir)
    for out in manifest.outputs:
        p = stage_dir / out.path
        if not p.is_file() or p.stat().st_size != out.bytes:
            return False
    if check_sha256:
        return all(file_sha256(stage_dir / out.path) == out.sha256 for out in manifest.outputs)
    return True
