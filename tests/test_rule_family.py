"""A new rule family is one module plus one registration line; the filter stage needs nothing else."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter, document_files, read_table
from refinery.tasks import filter as filter_stage
from refinery.tasks.filter import filter_config_model, registered, run_filter
from refinery.tasks.quality import FAMILIES, Rule, RuleFamily

# The whole family: settings, signals, rules and which documents it judges, in one module.
SHOUTING = '''
"""Shouting: prose written mostly in capital letters."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.quality import Batch, Rule, RuleFamily


class ShoutingRules(RuleFamily):
    """Drop prose whose letters are mostly capitals."""

    name = "shouting"
    applies_to = "prose"
    signal_fields = ("min_letters",)
    rules = (Rule("shouting", "shout_caps_frac", "max", "max_caps_frac"),)

    max_caps_frac: float = Field(0.5, ge=0, le=1)
    min_letters: int = Field(1, ge=1, description="documents with fewer letters score 0")

    def signals(self, batch: Batch) -> dict[str, Any]:
        upper = pc.count_substring_regex(batch.arr, r"\\p{Lu}").to_numpy(zero_copy_only=False)
        letters = pc.count_substring_regex(batch.arr, r"\\p{L}").to_numpy(zero_copy_only=False)
        frac = np.where(letters >= self.min_letters, upper / np.maximum(letters, 1), 0.0)
        return {"shout_caps_frac": frac}
'''

DOCS = [
    ("calm", "The committee met on Tuesday to discuss the library hours.", "text"),
    ("loud", "THE COMMITTEE MET ON TUESDAY TO DISCUSS THE LIBRARY HOURS!", "text"),
    ("mixed", "The COMMITTEE MET ON TUESDAY TO DISCUSS the library hours.", "markdown"),
    ("loud_code", "X = 1\nY = MAX(X, 2)\n", "code"),  # a prose family does not judge code
    ("quiet", "nothing to see here, just lower case words.", "text"),
]


def write_docs(directory: Path) -> list[Path]:
    rows = [{"id": i, "text": t, "source": f"mem://{i}", "format": f, "bytes": len(t), "meta": "{}"} for i, t, f in DOCS]
    writer = PartWriter(directory, DOCUMENT_SCHEMA, rows_per_part=2)
    writer.write(rows)
    writer.close()
    return document_files(directory)


@pytest.fixture()
def shouting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "shouting.py").write_text(SHOUTING)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module("shouting")


def test_a_new_family_is_one_module_and_one_line(tmp_path: Path, shouting) -> None:
    files = write_docs(tmp_path / "in")
    stage = tmp_path / "out"
    others_off = {f.name: {"enabled": False} for f in FAMILIES}
    with registered(shouting.ShoutingRules):  # the one registration line
        FilterConfig = filter_stage.FilterConfig  # looked up when it is used, so the new section is there
        assert FilterConfig().shouting.max_caps_frac == 0.5

        def cfg(**shout: object):
            return FilterConfig(pii={"enabled": False}, shouting=shout, **others_off)

        disabled = run_filter(files, stage, cfg(enabled=False), progress=False)
        first = run_filter(files, stage, cfg(), progress=False)
        signal_files = sorted(stage.glob("signals-*.parquet"))
        stamps = {p: os.stat(p).st_mtime_ns for p in signal_files}
        second = run_filter(files, stage, cfg(), progress=False)
        looser = run_filter(files, stage, cfg(max_caps_frac=0.9), progress=False)
        untouched = {p: os.stat(p).st_mtime_ns for p in signal_files} == stamps
        resignal = run_filter(files, stage, cfg(min_letters=2), progress=False)

    # (a) its signal column is in every signals file, one row per document
    assert len(signal_files) == len(files)
    for p in signal_files:
        assert pq.read_schema(p).names == ["id", "shout_caps_frac"]
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in signal_files) == len(DOCS)
    key = json.loads((stage / "signals.key.json").read_text())["signals"]
    assert key["families"] == {"shouting": {"min_letters": 2}}
    assert key["judged"] == {"shouting": ["web", "document"]}  # a prose family: its signals skip code

    # (b) enabling the family recomputed the signals; the same config reuses them untouched, and so does a
    # threshold change, while a signal setting recomputes them
    assert disabled.metrics["signals_reused"] == 0.0 and disabled.counts.dropped == {}
    assert first.metrics["signals_reused"] == 0.0
    assert second.metrics["signals_reused"] == 1.0
    assert looser.metrics["signals_reused"] == 1.0
    assert resignal.metrics["signals_reused"] == 0.0
    assert untouched

    # (c) its drops are counted under its reason code, in the counts, the metrics and dropped.parquet
    for result in (first, second):
        assert result.counts.dropped == {"shouting": 2}
        assert result.metrics["dropped_shouting"] == 2.0
    dropped = {r["id"]: r for r in pq.read_table(stage / "dropped.parquet").to_pylist()}
    assert {i: r["reason"] for i, r in dropped.items()} == {"loud": "shouting", "mixed": "shouting"}
    assert "shout_caps_frac=" in dropped["loud"]["detail"] and "> max_caps_frac=0.5" in dropped["loud"]["detail"]
    assert looser.counts.dropped == {"shouting": 1}
    kept = read_table(document_files(stage)).column("id").to_pylist()
    assert sorted(kept) == ["calm", "loud_code", "quiet"]

    # (d) every document is either kept or dropped
    for result in (disabled, first, second, looser, resignal):
        assert result.counts.in_ == result.counts.kept + result.counts.dropped_total == len(DOCS)

    # Leaving the block restores the registry and the config model.
    assert "shouting" not in {f.name for f in FAMILIES}
    with pytest.raises(ValidationError, match="shouting"):
        filter_stage.FilterConfig(shouting={})


def test_a_misdeclared_family_fails_when_defined() -> None:
    with pytest.raises(TypeError, match="max_lenght"):

        class Broken(RuleFamily):
            name = "broken"
            rules = (Rule("too_long", "length", "max", "max_lenght"),)
            max_length: int = 10

    with pytest.raises(TypeError, match="applies_to"):

        class Nowhere(RuleFamily):
            name = "nowhere"
            applies_to = "poetry"  # type: ignore[assignment]


def test_family_names_are_unique() -> None:
    first = FAMILIES[0]
    with pytest.raises(ValueError, match=repr(first.name)):
        filter_config_model([*FAMILIES, first])
    with pytest.raises(ValueError, match="'pii'"):

        class Pii(RuleFamily):
            name = "pii"

        filter_config_model([*FAMILIES, Pii])
