"""The shards stage's pipeline: call sizes, background shard writing and checksums leave the bytes alone."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter
from refinery.storage.manifest import file_sha256
from refinery.storage.shards import read_shard
from refinery.tasks import encode
from refinery.tasks.encode import ShardsConfig, run_encode
from refinery.tasks.tokenizer import EOT, TokenizerConfig, run_train_tokenizer

WORDS = ["delta", "river", "ñandú", "Straße", "数据", "🙂", "def f():", "\treturn 1", "</p>", "\n", "  ", EOT]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(5)
    rows = []
    for i in range(900):
        # Runs of empty documents, so batches of any size start, end and skip around them.
        n = 0 if i % 50 in (3, 4, 5) else rng.randint(1, 80)
        text = "".join(rng.choice(WORDS) + rng.choice([" ", ""]) for _ in range(n))
        rows.append({"id": f"p{i:04d}", "text": text, "source": f"raw/p{i % 4}.txt#{i}", "format": "text",
                     "bytes": len(text.encode()), "meta": "{}"})
    writer = PartWriter(root / "curated", schema=DOCUMENT_SCHEMA, rows_per_part=300, row_group_size=150)
    for start in range(0, len(rows), 150):
        writer.write(pa.Table.from_pylist(rows[start : start + 150], schema=DOCUMENT_SCHEMA))
    writer.close()
    files = sorted((root / "curated").glob("part-*.parquet"))
    run_train_tokenizer(files, root / "tokenizer", TokenizerConfig(vocab_size=600), progress=False)
    return files, root / "tokenizer" / "tokenizer.json"


CFG = ShardsConfig(shard_tokens=2500, val_fraction=0.2)


def digests(stage: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(stage.iterdir()) if p.is_file()}


def test_tokenizer_call_size_does_not_change_the_shards(corpus, tmp_path: Path) -> None:
    files, tokenizer = corpus
    whole = run_encode(files, tokenizer, tmp_path / "whole", CFG, progress=False)
    assert whole.extra["encoder"] == "gigatoken" and len(whole.extra["train_files"]) > 3
    for batch_docs in (1, 7, 149):
        run_encode(files, tokenizer, tmp_path / f"b{batch_docs}", CFG.model_copy(update={"batch_docs": batch_docs}),
                   progress=False)
        assert digests(tmp_path / f"b{batch_docs}") == digests(tmp_path / "whole")
    reference = CFG.model_copy(update={"encoder": "tokenizers", "batch_docs": 64})
    run_encode(files, tokenizer, tmp_path / "reference", reference, progress=False)
    assert digests(tmp_path / "reference") == digests(tmp_path / "whole")


def test_manifest_checksums_taken_in_memory_are_those_of_the_files(corpus, tmp_path: Path) -> None:
    files, tokenizer = corpus
    result = run_encode(files, tokenizer, tmp_path / "shards", CFG, progress=False)
    shards = [o for o in result.outputs if o.path.endswith(".arrow")]
    assert len(shards) == len(result.extra["train_files"]) + len(result.extra["val_files"]) > 4
    for output in result.outputs:
        path = tmp_path / "shards" / output.path
        assert output.sha256 == file_sha256(path) and output.bytes == path.stat().st_size
        if path.suffix == ".arrow":
            assert len(read_shard(path)[0]) == output.rows
    assert result.extra["shard_bytes"] == {o.path: o.bytes for o in shards}


def test_progress_names_only_shards_on_disk_and_the_last_shards_record_none(
    corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each recorded state, as written, names shards and records that are already on disk."""
    files, tokenizer = corpus
    stage = tmp_path / "shards"
    states: list[dict] = []
    real_save = encode._ShardWriter._save_state

    def save_and_check(self: encode._ShardWriter) -> None:
        real_save(self)
        state = json.loads((self.progress_dir / encode.STATE_FILE).read_text())
        for split in state["splits"].values():
            for shard in split["shards"]:
                assert (stage / shard["path"]).is_file() or shard["rows"] == 0
                assert (stage / encode.PROGRESS_DIR / f"{Path(shard['path']).stem}.parquet").is_file()
        states.append(state)

    monkeypatch.setattr(encode._ShardWriter, "_save_state", save_and_check)
    result = run_encode(files, tokenizer, stage, CFG, progress=False)
    written = len(result.extra["train_files"]) + len(result.extra["val_files"])
    assert 2 < len(states) <= written - 2  # one per shard, except the last of each split
    assert not (stage / encode.PROGRESS_DIR).exists()
