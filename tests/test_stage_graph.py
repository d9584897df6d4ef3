"""The stage graph is declared once (flows/stages.py) and everything follows it.

The main test adds a stage through the declaration alone: a pass-through stage
between filter and tokenizer, declared in this file and activated with
`use_graph`, with no edit anywhere else. Through the real Prefect flow it runs,
is skipped on the second run, is a task run whose upstream task runs are exactly
its declared inputs, gets its own config section, and shows in `refinery lineage`
and in the catalog.
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from refinery.flows.config import config_model
from refinery.flows.graph import Graph, Stage, StageCall, View, use_graph
from refinery.flows.stages import PIPELINE
from refinery.storage.manifest import Counts, StageResult, describe_file
from refinery.storage.outputs import Documents

ROOT = Path(__file__).resolve().parents[1]
WORDS = "river stone bridge market village harbour summer winter garden letter window morning".split()
GLUE = ["the", "and", "of", "to", "with", "that", "in", "on", "for", "was"]
DATA = {
    "filter": {f: {"enabled": False} for f in ("gopher_quality", "gopher_repetition", "c4", "fineweb", "code")},
    "tokenizer": {"vocab_size": 300},
    "shards": {"val_fraction": 0.2},
    "execution": {"progress": False},
}


# --------------------------------------------------------------------------- a new stage, declared here alone


class PolishConfig(BaseModel):
    """The new stage's settings: one section of the pipeline config, like every stage's."""

    model_config = ConfigDict(extra="forbid")

    note: str = "unchanged"


def polish(call: StageCall) -> StageResult:
    """Hands the curated documents on unchanged (a stand-in for a real stage's work)."""
    docs = call.one(Documents)
    outputs = []
    for part in docs.files:
        shutil.copyfile(part, call.dir / part.name)
        outputs.append(describe_file(call.dir, call.dir / part.name, rows=pq.read_metadata(part).num_rows))
    return StageResult(outputs=outputs, counts=Counts(**{"in": docs.documents, "kept": docs.documents}))


def with_polish(graph: Graph) -> Graph:
    """`graph` with `polish` between filter and the stages that read the curated documents."""
    stages: list[Stage] = []
    for stage in graph.stages:
        if stage.name == "tokenizer":
            stages.append(Stage("polish", PolishConfig, ("filter",), polish, Documents, views=(View("", "part-*.parquet"),)))
        reads = tuple("polish" if i == "filter" else i for i in stage.inputs)
        stages.append(dataclasses.replace(stage, inputs=reads))
    return Graph(tuple(stages))


def write_corpus(folder: Path) -> str:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for i in range(14):
        sentences = [" ".join(rng.choice(WORDS if k % 2 else GLUE) for k in range(12)).capitalize() + "."
                     for _ in range(20)]
        (folder / f"doc-{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    return str(folder)


def upstream_task_runs(flow_run_id) -> dict[str, list[str]]:
    """Each task run of a flow run (by stage name) with the stage names of its upstream task runs, from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {r.id: r.name.rsplit("-", 1)[0] for r in runs}
    return {names[r.id]: sorted(names[i.id] for v in r.task_inputs.values() for i in v if hasattr(i, "id"))
            for r in runs}


def test_a_stage_added_through_the_declaration_alone(tmp_path, monkeypatch) -> None:
    from refinery.flows.cli import app
    from refinery.flows.pipeline import data_to_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run root's own store

    graph = with_polish(PIPELINE)
    sources = [write_corpus(tmp_path / "corpus")]
    root = tmp_path / "run"
    upto = graph.upstream("shards")
    assert upto == ["ingest", "dedup", "filter", "polish", "tokenizer", "shards"]
    with use_graph(graph):
        config = {**DATA, "polish": {"note": "declared in a test"}}  # its config section exists
        first = data_to_model(sources=sources, root=str(root), config=config, stages=upto, return_state=True)
        summary = first.result()
        assert {s: v["status"] for s, v in summary["stages"].items()} == {s: "ran" for s in upto}
        polished = summary["stages"]["polish"]
        assert polished["in"] == polished["kept"] == summary["stages"]["filter"]["kept"] > 0
        assert summary["stages"]["tokenizer"]["in"] == polished["kept"]

        # Prefect's graph: the new stage is a task run whose upstreams are exactly its declared inputs.
        upstream = upstream_task_runs(first.state_details.flow_run_id)
        assert set(upstream) == set(upto)
        for name, ups in upstream.items():
            assert ups == sorted(graph[name].inputs), (name, ups)
        assert upstream["polish"] == ["filter"] and upstream["tokenizer"] == ["polish"]

        second = data_to_model(sources=sources, root=str(root), config=config, stages=upto)
        assert {s: v["status"] for s, v in second["stages"].items()} == {s: "skipped" for s in upto}

        # A changed setting of the new stage re-runs it and what reads it, nothing upstream.
        third = data_to_model(sources=sources, root=str(root), config={**config, "polish": {"note": "changed"}},
                              stages=upto)
        assert {s: v["status"] for s, v in third["stages"].items()} == {
            "ingest": "skipped", "dedup": "skipped", "filter": "skipped",
            "polish": "ran", "tokenizer": "skipped", "shards": "skipped",  # same bytes in: same input digest
        }

        # `refinery lineage` shows it between filter and tokenizer, up to date.
        out_dir = tmp_path / "lineage"
        overrides = [f"--set={k}" for k in (
            "polish.note=changed", "tokenizer.vocab_size=300", "shards.val_fraction=0.2", "execution.progress=false",
            *(f"filter.{f}.enabled=false" for f in DATA["filter"]))]
        result = CliRunner().invoke(app, ["lineage", "--root", str(root), "--source", sources[0], *overrides,
                                          "--out", str(out_dir), "--no-log"])
        assert result.exit_code == 0, result.output
        lines = [line.split()[1] for line in result.output.splitlines() if line.strip().startswith("└─")]
        assert lines[:6] == upto, result.output
        assert re.search(r"└─ polish .*✓", result.output), result.output
        assert "train" in lines and "· not run" in result.output  # the stages not run in this test
        mermaid = (out_dir / "lineage.mmd").read_text()
        assert mermaid.count("-->") == len(graph.edges()) + 1  # plus the source into ingest

        # Its catalog view, like every documents stage.
        catalog = graph.catalog(root)
        assert "polish" in catalog.views
        assert catalog.query("select count(*) from polish").fetchall()[0][0] == polished["kept"]


# --------------------------------------------------------------------------- the declaration itself


def test_everything_derives_from_the_declaration() -> None:
    assert PIPELINE.names == ("ingest", "dedup", "filter", "tokenizer", "shards", "train", "eval")
    assert PIPELINE.edges() == [
        ("ingest", "dedup"), ("dedup", "filter"), ("filter", "tokenizer"), ("filter", "shards"),
        ("tokenizer", "shards"), ("shards", "train"), ("train", "eval"), ("tokenizer", "eval"), ("shards", "eval"),
    ]
    # the config's sections are the stages', then tracking and execution
    assert list(config_model(PIPELINE).model_fields) == [*PIPELINE.names, "tracking", "execution"]
    extended = with_polish(PIPELINE)
    assert "polish" in config_model(extended).model_fields
    # --from re-runs a stage and every stage that reads it, directly or not
    assert PIPELINE.select(None, "tokenizer") == (["tokenizer", "shards", "train", "eval"],
                                                  {"tokenizer", "shards", "train", "eval"})
    assert extended.downstream("polish") == ["polish", "tokenizer", "shards", "train", "eval"]
    from refinery.storage.outputs import Checkpoint, Shards

    assert PIPELINE.producing(Shards).name == "shards"
    data_only = Graph(PIPELINE.stages[:5])  # a pipeline without a model: nothing to register, no model edges
    assert data_only.producing(Checkpoint, required=False) is None
    assert [v[0] for v in PIPELINE.catalog_views()] == [
        "ingest", "quarantine", "dedup", "filter", "signals", "shard_stats", "provenance"]


def test_a_bad_declaration_is_refused_with_the_reason() -> None:
    import pytest

    ingest = PIPELINE["ingest"]
    with pytest.raises(ValueError, match="must be declared before it"):
        Graph((dataclasses.replace(PIPELINE["dedup"]), ingest))
    with pytest.raises(ValueError, match="declared twice"):
        Graph((ingest, ingest))
    with pytest.raises(ValueError, match="stage name"):
        Graph((dataclasses.replace(ingest, name="tracking"),))


def test_the_architecture_doc_shows_the_declared_graph() -> None:
    """docs/architecture.md carries the diagram `refinery stages --mermaid` prints; regenerate it when the graph changes."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- stage-graph:begin -->\n```mermaid\n(.*?)```\n<!-- stage-graph:end -->", doc, re.S)
    assert block, "docs/architecture.md lost its stage-graph block"
    assert block.group(1) == PIPELINE.mermaid(), "the diagram is out of date: run `refinery stages --mermaid`"


def test_logging_a_model_leaves_no_tracking_uri_behind(tmp_path, monkeypatch) -> None:
    """MLflow's fluent API exports MLFLOW_TRACKING_URI; the pipeline restores it, so one root's store
    never becomes the next command's (`RunLayout.tracking_uri` reads the variable as the user's choice)."""
    import os

    from refinery.storage.layout import RunLayout, fluent_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with fluent_tracking(f"sqlite:///{tmp_path / 'a.db'}"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert RunLayout.at(tmp_path / "b").tracking_uri() == f"sqlite:///{(tmp_path / 'b').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with fluent_tracking(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    assert RunLayout.at(tmp_path / "b").tracking_uri() == "http://127.0.0.1:5000"
