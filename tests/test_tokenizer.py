"""The tokenizer stage: byte-level BPE that round-trips any text, trained or brought."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter
from refinery.tasks.tokenizer import EOT, TokenizerConfig, load_tokenizer, run_train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["the", "river", "flows", "déjà", "vu", "日本語", "😀", "def f(x):", "return", "<p>", "</p>", "\n", "\t", "  "]


def write_corpus(directory: Path, n: int = 600, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 80)))
        fmt = rng.choice(["text", "code", "html"])
        rows.append({"id": f"doc-{i}", "text": text, "source": f"file{i % 7}#{i}", "format": fmt,
                     "bytes": len(text), "meta": "{}"})
    writer = PartWriter(directory, schema=DOCUMENT_SCHEMA, rows_per_part=250)
    writer.write(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA))
    writer.close()
    return sorted(directory.glob("part-*.parquet"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tok")
    files = write_corpus(root / "curated")
    cfg = TokenizerConfig(vocab_size=600, special_tokens=[EOT, "<|pad|>"])
    result = run_train_tokenizer(files, root / "tokenizer", cfg, progress=False)
    return root, files, result


def test_stage_writes_a_loadable_tokenizer_and_reports_compression(trained) -> None:
    root, _, result = trained
    stage = root / "tokenizer"
    assert {o.path for o in result.outputs} == {"tokenizer.json", "tokenizer_config.json"}
    assert result.extra["tokenizer_file"] == "tokenizer.json"
    tok, eot_id = load_tokenizer(stage / "tokenizer.json")
    assert result.extra["eot_id"] == eot_id == tok.token_to_id(EOT)
    assert result.extra["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) <= 600
    assert tok.token_to_id("<|pad|>") is not None
    # compression measured on the validation split, overall and per format
    assert result.metrics["bytes_per_token"] > 1.0
    assert {"bytes_per_token.text", "bytes_per_token.code", "bytes_per_token.html"} <= set(result.metrics)
    assert result.metrics["train_seconds"] > 0


def test_counts_add_up_and_val_documents_are_not_trained_on(trained) -> None:
    _, _, result = trained
    c = result.counts
    assert c.in_ == 600
    c.check("tokenizer")
    assert c.kept > 0 and c.dropped["val_split"] > 0
    assert c.dropped.get("empty_text", 0) >= 1  # randint(0, 80) words gives some empty documents


def test_transformers_loads_the_file_and_agrees(trained) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    root, _, _ = trained
    stage = root / "tokenizer"
    fast = PreTrainedTokenizerFast(tokenizer_file=str(stage / "tokenizer.json"))
    tok, _ = load_tokenizer(stage / "tokenizer.json")
    text = "the river flows déjà vu 😀"
    assert fast(text)["input_ids"] == tok.encode(text).ids
    assert fast.decode(fast(text)["input_ids"]) == text
    auto = AutoTokenizer.from_pretrained(str(stage))
    assert auto.eos_token == EOT


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_decode_of_encode_is_identity_for_any_unicode(trained, text: str) -> None:
    root, _, _ = trained
    tok, eot_id = load_tokenizer(root / "tokenizer" / "tokenizer.json")
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert eot_id not in ids  # special tokens come only from the pipeline


def test_special_token_text_in_a_document_is_not_a_special_token(trained) -> None:
    root, _, _ = trained
    tok, eot_id = load_tokenizer(root / "tokenizer" / "tokenizer.json")
    text = f"a document quoting {EOT} in its body"
    ids = tok.encode(text).ids
    assert eot_id not in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_existing_tokenizer_is_brought_instead_of_trained(trained, tmp_path: Path) -> None:
    root, files, first = trained
    cfg = TokenizerConfig(existing=str(root / "tokenizer" / "tokenizer.json"))
    result = run_train_tokenizer(files, tmp_path / "tokenizer", cfg, progress=False)
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == (root / "tokenizer" / "tokenizer.json").read_bytes()
    assert result.extra["trained"] is False and result.counts.kept == 0
    result.counts.check("tokenizer")
    assert result.metrics["bytes_per_token"] == pytest.approx(first.metrics["bytes_per_token"])


def test_existing_tokenizer_without_end_of_text_is_rejected(trained, tmp_path: Path) -> None:
    root, files, _ = trained
    data = json.loads((root / "tokenizer" / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != EOT]
    data["model"]["vocab"].pop(EOT)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="endoftext"):
        run_train_tokenizer(files, tmp_path / "out", TokenizerConfig(existing=str(bad)), progress=False)


def test_training_is_deterministic(trained, tmp_path: Path) -> None:
    root, files, _ = trained
    cfg = TokenizerConfig(vocab_size=600, special_tokens=[EOT, "<|pad|>"])
    run_train_tokenizer(files, tmp_path / "again", cfg, progress=False)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (root / "tokenizer" / "tokenizer.json").read_bytes()


def test_sample_bytes_limits_the_training_sample(trained, tmp_path: Path) -> None:
    _, files, full = trained
    result = run_train_tokenizer(files, tmp_path / "small", TokenizerConfig(vocab_size=400, sample_bytes=5000),
                                 progress=False)
    assert 0 < result.counts.kept < full.counts.kept
    assert result.counts.dropped["not_sampled"] > 0
    assert result.metrics["sample_bytes"] <= 5000 + 2000  # stops after the document that crosses the budget


@pytest.mark.parametrize(
    ("key", "value"),
    [("vocab_size", 10), ("min_frequency", 0), ("sample_bytes", 0), ("special_tokens", []), ("vocabulary", 5),
     ("val_fraction", 1.0)],
)
def test_bad_config_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ValidationError, match=key):
        TokenizerConfig(**{key: value})
