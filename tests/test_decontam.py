"""Decontamination: documents sharing a 13-gram with an evaluation set are dropped, a 12-gram is not."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter, document_files, read_table
from refinery.storage.manifest import config_hash
from refinery.tasks.decontaminate import NgramIndex, rolling_ngram_hashes, words_of
from refinery.tasks.filter import FilterConfig, run_filter
from refinery.tasks.quality import FAMILIES

EVAL = (
    "Question: the lighthouse keeper counted forty seven gulls on the northern pier before the storm "
    "reached the harbour at dusk. How many gulls remained after nine flew away?"
)
EVAL_WORDS = words_of(EVAL)
FILLER = "Our village newsletter reports on the weather, the market, and the school play this week. "


def _with(words: list[str]) -> str:
    return FILLER + " ".join(words) + ". " + FILLER


def write_docs(directory: Path, docs: list[tuple[str, str]]) -> list[Path]:
    rows = [{"id": i, "text": t, "source": f"mem://{i}", "format": "text", "bytes": len(t), "meta": "{}"} for i, t in docs]
    writer = PartWriter(directory, DOCUMENT_SCHEMA, rows_per_part=2)
    writer.write(rows)
    writer.close()
    return document_files(directory)


def only_decontamination(**settings) -> FilterConfig:
    data = {f.name: {"enabled": f.name == "decontamination"} for f in FAMILIES}
    data["decontamination"].update(settings)
    return FilterConfig(pii={"enabled": False}, **data)


@pytest.fixture()
def eval_set(tmp_path: Path) -> Path:
    path = tmp_path / "evals" / "gulls.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"text": EVAL, "answer": "38"}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    return path


DOCS = [
    ("has_13gram", _with(EVAL_WORDS[3:16])),
    ("has_12gram", _with(EVAL_WORDS[3:15])),
    ("two_12grams_apart", _with(EVAL_WORDS[0:12]) + " unrelated words here " + _with(EVAL_WORDS[13:25])),
    ("case_and_punct", FILLER + "THE LIGHTHOUSE -- keeper counted: forty-seven gulls, on the NORTHERN pier before The!"),
    ("clean", FILLER * 3),
]


def test_13gram_dropped_12gram_kept(tmp_path: Path, eval_set: Path) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    result = run_filter(files, tmp_path / "out", only_decontamination(eval_sets=[str(eval_set)]), progress=False)
    kept = set(read_table(document_files(tmp_path / "out")).column("id").to_pylist())
    assert kept == {"has_12gram", "two_12grams_apart", "clean"}
    assert result.counts.dropped == {"contaminated": 2}
    assert result.counts.in_ == result.counts.kept + result.counts.dropped_total == len(DOCS)
    dropped = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "dropped.parquet").to_pylist()}
    assert set(dropped) == {"has_13gram", "case_and_punct"}
    assert all(r["reason"] == "contaminated" for r in dropped.values())
    # the matched span is recorded, normalised to lower-case words
    assert " ".join(EVAL_WORDS[3:16]) in dropped["has_13gram"]["detail"]
    assert "decontam_ngrams=1 > max_ngram_matches=0" in dropped["has_13gram"]["detail"]
    assert result.metrics["dropped_contaminated"] == 2


def test_n_is_configurable_and_flag_only_keeps_with_counts(tmp_path: Path, eval_set: Path) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    cfg = only_decontamination(eval_sets=[str(eval_set.parent)], n=12, max_ngram_matches=None)
    result = run_filter(files, tmp_path / "out", cfg, progress=False)
    assert result.counts.dropped == {}
    table = read_table(document_files(tmp_path / "out"))
    matches = dict(zip(table.column("id").to_pylist(), table.column("decontam_ngrams").to_pylist(), strict=True))
    # a 13-gram holds two 12-grams; the 12-gram doc one; two separate 12-grams two
    assert matches == {"has_13gram": 2, "has_12gram": 1, "two_12grams_apart": 2, "case_and_punct": 2, "clean": 0}
    origin = dict(zip(table.column("id").to_pylist(), table.column("decontam_eval_set").to_pylist(), strict=True))
    assert origin["has_12gram"] == "gulls.jsonl" and origin["clean"] == ""


def test_a_match_count_threshold(tmp_path: Path, eval_set: Path) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    cfg = only_decontamination(eval_sets=[str(eval_set)], n=12, max_ngram_matches=1)
    result = run_filter(files, tmp_path / "out", cfg, progress=False)
    assert result.counts.dropped == {"contaminated": 3}  # the three documents with 2 matching 12-grams


def test_parquet_and_text_eval_sets(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [EVAL]}), tmp_path / "set.parquet")
    (tmp_path / "set.txt").write_text("one two three four five six seven eight nine ten eleven twelve thirteen")
    index = NgramIndex.build([tmp_path / "set.parquet", tmp_path / "set.txt"], n=13, text_field="prompt")
    assert len(index) == (len(EVAL_WORDS) - 12) + 1
    out = index.scan([_with(EVAL_WORDS[5:18]), "ONE two three four five six seven eight nine ten eleven twelve thirteen!"])
    assert list(out["decontam_ngrams"]) == [1, 1]
    assert out["decontam_eval_set"] == ["set.parquet", "set.txt"]
    with pytest.raises(ValueError, match="no column 'text'"):
        NgramIndex.build([tmp_path / "set.parquet"], n=13)


def test_bad_eval_set_config_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="filter.decontamination.eval_sets"):
        FilterConfig(decontamination={"eval_sets": [str(tmp_path / "missing.jsonl")]}).model_dump()
    with pytest.raises(ValidationError, match="decontamination.n"):
        FilterConfig(decontamination={"n": 1})


def test_editing_an_eval_set_changes_the_filter_config_hash(tmp_path: Path, eval_set: Path) -> None:
    cfg = FilterConfig(decontamination={"eval_sets": [str(eval_set)]})
    before = config_hash(cfg)
    assert config_hash(FilterConfig.model_validate(cfg.model_dump(mode="json"))) == before  # round-trips
    eval_set.write_text(json.dumps({"text": EVAL + " A new final sentence."}) + "\n")
    assert config_hash(cfg) != before
    assert config_hash(FilterConfig()) != before  # off when no eval sets


def test_rolling_hash_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**63, size=20, dtype=np.uint64)
    got = rolling_ngram_hashes(w, 5)
    base = 0x9E3779B97F4A7C15
    for i in range(len(got)):
        want = 0
        for k in range(5):
            want = (want * base + int(w[i + k])) % 2**64
        assert int(got[i]) == want
    assert len(rolling_ngram_hashes(w[:4], 5)) == 0


def test_worker_processes_give_identical_results(tmp_path: Path, eval_set: Path) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    cfg = only_decontamination(eval_sets=[str(eval_set)])
    local = run_filter(files, tmp_path / "local", cfg, progress=False)
    with ProcessPoolExecutor(2) as pool:
        remote = run_filter(files, tmp_path / "pool", cfg, progress=False, executor=pool)
    assert local.counts == remote.counts
    a = pq.read_table(tmp_path / "local" / "dropped.parquet")
    b = pq.read_table(tmp_path / "pool" / "dropped.parquet")
    assert a.equals(b)
