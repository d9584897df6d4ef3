"""The pipeline, declared once: every stage, what it reads, how it runs, what it hands on.

```
sources ─► ingest ─► dedup ─► filter ─┬─► tokenizer ─┐
                                      └──────────────┴─► shards ─► train ─► eval
```

Each entry says: the stage's name (its folder in the run root and its config
section), its config model, the stages whose outputs it reads, the function
that runs it (a thin adapter over the stage logic in `refinery.tasks`), its
typed output (storage/outputs.py), the files it logs as artifacts, its
catalog views, and its code version. The flow, the config, lineage and
staleness, the catalog and docs/architecture.md all derive from `PIPELINE`:
adding a stage is one entry here (see docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

from refinery.flows.graph import Graph, Stage, StageCall, View
from refinery.model.train import TrainConfig
from refinery.storage.manifest import StageResult
from refinery.storage.outputs import Checkpoint, Documents, Evaluation, Shards, TokenizerFile
from refinery.tasks.dedup import DedupConfig
from refinery.tasks.encode import ShardsConfig
from refinery.tasks.evaluate import EvalConfig
from refinery.tasks.ingest import IngestConfig, source_digest
from refinery.tasks.tokenizer import TokenizerConfig


def filter_config() -> type:
    """The filter's config model, looked up when used: it is built from the registered rule families."""
    from refinery.tasks import filter as filter_stage

    return filter_stage.FilterConfig


# --------------------------------------------------------------------------- how each stage runs


def ingest(call: StageCall) -> StageResult:
    from refinery.tasks.ingest import run_ingest

    return run_ingest(call.sources, call.dir, call.cfg, progress=call.progress, executor=call.executor)


def dedup(call: StageCall) -> StageResult:
    from refinery.tasks.dedup import run_dedup

    return run_dedup(call.one(Documents).files, call.dir, call.cfg, progress=call.progress, executor=call.executor)


def filter_documents(call: StageCall) -> StageResult:
    from refinery.tasks.filter import run_filter

    return run_filter(call.one(Documents).files, call.dir, call.cfg, progress=call.progress, executor=call.executor)


def train_tokenizer(call: StageCall) -> StageResult:
    from refinery.tasks.tokenizer import run_train_tokenizer

    return run_train_tokenizer(call.one(Documents).files, call.dir, call.cfg, progress=call.progress)


def encode(call: StageCall) -> StageResult:
    from refinery.tasks.encode import run_encode

    return run_encode(
        call.one(Documents).files, call.one(TokenizerFile).file, call.dir, call.cfg,
        progress=call.progress, executor=call.executor,
    )


def train(call: StageCall) -> StageResult:
    from refinery.storage.layout import RunLayout
    from refinery.storage.manifest import config_hash
    from refinery.tasks.train import run_train

    shards = call.one(Shards)
    return run_train(
        shards, call.dir, call.cfg, run_key=call.input_digest + config_hash(call.cfg),
        on_metrics=call.on_metrics, progress=call.progress, tokenizer_file=_shards_tokenizer(shards),
        tracking_uri=call.tracking_uri or RunLayout.at(call.dir.parent).tracking_uri(), input_digest=call.input_digest,
        code_version=call.code_version,
    )


def _shards_tokenizer(shards: Shards) -> Path | None:
    """The tokenizer the shards were encoded with: the output of the tokenizer stage the shards stage reads.

    The train stage keeps it with its checkpoints, so continued training can tell
    whether a source model's weights fit these token ids.
    """
    from refinery.flows.graph import active

    graph = active()
    if shards.stage not in graph.names:
        return None
    for name in graph[shards.stage].inputs:
        if issubclass(graph[name].output, TokenizerFile):
            found = TokenizerFile.read(shards.dir.parent / name)
            return found.file if found is not None else None
    return None


def evaluate(call: StageCall) -> StageResult:
    from refinery.tasks.evaluate import run_eval

    return run_eval(call.one(Checkpoint), call.one(TokenizerFile), call.one(Shards), call.dir, call.cfg)


# --------------------------------------------------------------------------- the graph

PARTS = View("", "part-*.parquet")  # a documents stage's kept documents; the view takes the stage's name

PIPELINE = Graph((
    Stage("ingest", IngestConfig, (), ingest, Documents, reads_sources=source_digest,
          version=2,  # 2: dataset files streamed by record; HTML through trafilatura, WARC through resiliparse
          summary="raw files and dataset records to one documents table; unreadable input quarantined",
          views=(PARTS, View("quarantine", "quarantine.parquet"))),
    Stage("dedup", DedupConfig, ("ingest",), dedup, Documents, version=2,  # 2: decisions from the current input alone
          summary="normalisation, exact and MinHash near-duplicates", views=(PARTS,)),
    Stage("filter", filter_config, ("dedup",), filter_documents, Documents, version=3,  # 2: words as str.split(); 3: lid.176 language ID, rechecked on prose lines
          summary="quality rules, language ID, PII, safety, decontamination",
          artifacts=("drop_reasons.png",), views=(PARTS, View("signals", "signals-*.parquet"))),
    Stage("tokenizer", TokenizerConfig, ("filter",), train_tokenizer, TokenizerFile, version=2,  # 2: split by text
          summary="byte-level BPE trained on the curated documents"),
    Stage("shards", ShardsConfig, ("filter", "tokenizer"), encode, Shards, version=2,  # 2: split by text
          summary="curated documents encoded into memory-mappable Arrow shards",
          views=(View("shard_stats", "stats.parquet"),)),
    Stage("train", TrainConfig, ("shards",), train, Checkpoint, retry_io=False,
          summary="a decoder-only transformer trained from scratch or continued (train.init_from)",
          artifacts=("loss_curve.png", "metrics.jsonl", "tokens_seen_by_format.json"),
          views=(View("provenance", "provenance.parquet"),)),
    Stage("eval", EvalConfig, ("train", "tokenizer", "shards"), evaluate, Evaluation, retry_io=False,
          summary="validation loss, bits per byte, a unigram baseline, samples",
          artifacts=("metrics.json", "samples.jsonl")),
))  # fmt: skip
