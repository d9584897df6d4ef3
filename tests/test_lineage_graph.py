"""`refinery lineage`: the graph from sources to model versions, and staleness after a change.

The run root is made by the declared stage functions, chained with manifests the
way the pipeline flow chains them (input digest from the inputs' output digests), and
a real MLflow store (SQLite) holding a pipeline run and a registered model
version tagged like the flow tags it. No Prefect server is needed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from stage_runner import run_stages

from refinery.flows.config import validate_config
from refinery.flows.lineage_graph import (
    IMAGE_NAME,
    MERMAID_NAME,
    build_graph,
    main,
    render_mermaid,
    render_text,
)
from refinery.flows.stages import PIPELINE
from refinery.storage.layout import RunLayout
from refinery.storage.manifest import read_manifest

STAGES = PIPELINE.names

WORDS = (
    "river stone bridge market village harbour summer winter garden letter window morning evening "
    "teacher doctor farmer engine valley forest mountain castle kitchen library lantern meadow"
).split()
GLUE = ["the", "and", "of", "to", "with", "that", "in", "on", "for", "was"]

TINY = {
    "filter": {f: {"enabled": False} for f in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb", "code")},
    "tokenizer": {"vocab_size": 300},
    "shards": {"val_fraction": 0.2},
    "train": {"preset": "test", "seq_len": 32, "micro_batch_size": 4, "tokens_per_step": 128, "max_steps": 2,
              "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "warmup_steps": 1},
    "eval": {"max_batches": 1, "max_new_tokens": 2, "prompts": ["The "]},
    "execution": {"progress": False},
}


def write_corpus(root: Path) -> list[str]:
    """Two source roots of small prose files."""
    rng = random.Random(0)
    sources = []
    for name, n in (("books", 12), ("web", 6)):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            sentences = [" ".join(rng.choice(WORDS if k % 2 else GLUE) for k in range(12)).capitalize() + "."
                         for _ in range(20)]
            (d / f"{name}-{i:02d}.txt").write_text(" ".join(sentences) + "\n")
        sources.append(str(d))
    return sources


def run_chain(root: Path, sources: list[str], cfg: Any, stages: tuple[str, ...] = STAGES) -> None:
    """What `refinery run` does per stage, minus Prefect: the declared stage functions, manifests written last."""
    run_stages(root, sources, cfg, stages)


def record_in_mlflow(root: Path, sources: list[str]) -> None:
    """A pipeline run with its sources, and a model version tagged with the training digests."""
    from mlflow.tracking import MlflowClient

    layout = RunLayout.at(root)
    client = MlflowClient(tracking_uri=layout.mlflow_tracking_uri)
    exp = client.create_experiment("refinery", artifact_location=layout.mlflow_artifacts.resolve().as_uri())
    parent = client.create_run(exp, tags={"refinery.kind": "pipeline"})
    client.log_param(parent.info.run_id, "sources", ",".join(sources))
    train = read_manifest(layout.stage_dir("train"))
    run = client.create_run(exp, tags={"refinery.kind": "stage", "refinery.stage": "train",
                                       "refinery.output_digest": train.output_digest})
    client.create_registered_model("refinery-lm")
    client.create_model_version(
        "refinery-lm", source=str(layout.stage_dir("train")), run_id=run.info.run_id,
        tags={"refinery.output_digest": train.output_digest, "refinery.input_digest": train.input_digest},
    )


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("lineage")
    sources = write_corpus(base / "corpus")
    cfg = validate_config(TINY)
    run_chain(base / "run", sources, cfg)
    record_in_mlflow(base / "run", sources)
    return base / "run", sources, cfg


def statuses(graph) -> dict[str, str]:
    return {n.label: n.status for n in graph.nodes}


def test_a_fresh_run_is_up_to_date(run_root) -> None:
    root, sources, cfg = run_root
    graph = build_graph(root, sources, cfg)
    assert statuses(graph) == {**{s: "ok" for s in STAGES}, sources[0]: "ok", sources[1]: "ok", "refinery-lm v1": "ok"}
    assert graph.first_stale() is None and graph.rerun_command() is None
    assert graph.node("stage:train").info["mlflow_run_id"]  # the MLflow run that recorded the manifest
    assert ("stage:train", "model:1") in graph.edges and (f"source:file://{sources[0]}", "stage:ingest") in graph.edges
    assert "Everything is up to date" in render_text(graph)


def test_one_changed_source_file_makes_ingest_and_everything_downstream_stale(run_root, tmp_path) -> None:
    root, sources, cfg = run_root
    changed = Path(sources[1]) / "web-03.txt"
    original, stat = changed.read_text(), changed.stat()
    try:
        changed.write_text(original + "One more sentence about the harbour.\n")
        graph = build_graph(root, sources, cfg)
        assert statuses(graph) == {
            **{s: "stale" for s in STAGES},
            sources[0]: "ok",
            sources[1]: "changed",
            "refinery-lm v1": "stale",
        }
        assert graph.node("stage:ingest").reasons == ["sources changed"]
        assert graph.node(f"source:file://{sources[1]}").reasons == ["1 file(s) changed since the last ingest"]
        assert graph.rerun_command() == f"refinery run --root {root} --from ingest"
        text = render_text(graph)
        assert "--from ingest" in text and text.count("STALE") == len(STAGES) + 1  # and the model
    finally:
        changed.write_text(original)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_graph(root, sources, cfg).first_stale() is None  # restored: up to date again


def test_a_config_change_is_stale_from_its_stage_on(run_root) -> None:
    root, sources, cfg = run_root
    changed = validate_config({**TINY, "shards": {"val_fraction": 0.25}})
    graph = build_graph(root, sources, changed, use_mlflow=False)
    # tokenizer shares val_fraction with shards (one validation split), so it is stale too
    assert [n.label for n in graph.stages if n.status == "stale"] == ["tokenizer", "shards", "train", "eval"]
    assert graph.node("stage:tokenizer").reasons == ["config changed"]
    assert graph.node("stage:shards").reasons == ["upstream stage tokenizer is stale", "config changed"]
    evaluated = validate_config({**TINY, "eval": {"max_batches": 2, "max_new_tokens": 2, "prompts": ["The "]}})
    assert build_graph(root, sources, evaluated, use_mlflow=False).stale_stages() == ["eval"]


def test_main_prints_renders_and_logs(run_root, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    root = run_root[0]
    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(TINY))
    lines: list[str] = []
    graph = main(root, config_file=config, out_dir=tmp_path / "out", echo=lines.append)  # sources from MLflow
    assert graph.first_stale() is None
    assert "Lineage of" in lines[0]
    png = (tmp_path / "out" / IMAGE_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    mermaid = (tmp_path / "out" / MERMAID_NAME).read_text()
    assert mermaid == render_mermaid(graph) and mermaid.startswith("flowchart LR")
    assert mermaid.count("-->") == len(graph.edges)
    client = MlflowClient(tracking_uri=RunLayout.at(root).mlflow_tracking_uri)
    exp = client.get_experiment_by_name("refinery")
    parent = client.search_runs([exp.experiment_id], "tags.`refinery.kind` = 'pipeline'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "lineage")}
    assert logged == {"lineage/lineage.png", "lineage/lineage.mmd", "lineage/lineage.txt"}


def test_the_rerun_command_repeats_the_run_options(run_root, tmp_path) -> None:
    root, sources, _ = run_root
    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(TINY))
    lines: list[str] = []
    graph = main(root, sources=sources, config_file=config, overrides=["eval.max_new_tokens=3"],
                 out_dir=tmp_path, log=False, echo=lines.append)
    assert graph.stale_stages() == ["eval"]
    want = (f"refinery run --source {sources[0]} --source {sources[1]} --config {config} "
            f"--set eval.max_new_tokens=3 --root {root} --from eval")
    assert graph.rerun_command() == want and f"  {want}" in "\n".join(lines)


def test_provenance_is_written_and_logged_with_the_model_run(run_root) -> None:
    from mlflow.tracking import MlflowClient

    from refinery.flows.lineage_graph import record_provenance

    root, sources, _ = run_root
    layout = RunLayout.at(root)
    client = MlflowClient(tracking_uri=layout.mlflow_tracking_uri)
    run_id = client.search_model_versions("name = 'refinery-lm'")[0].run_id
    path = record_provenance(layout, sources, client, run_id)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert sum(table.column("tokens").to_pylist()) == read_manifest(layout.stage_dir("shards")).extra["train_tokens"]
    assert {r.split("/")[0] for r in table.column("source_root").to_pylist()} == {"file:"}
    assert [a.path for a in client.list_artifacts(run_id, "provenance")] == ["provenance/provenance.parquet"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["provenance.tokens.format.text"] == sum(table.column("tokens").to_pylist())
    # the provenance view is queryable like the other outputs
    import duckdb

    got = duckdb.connect().execute(f"select count(distinct source_root) from read_parquet('{path}')").fetchone()[0]
    assert got == 2


def test_missing_stages_and_no_run_root(tmp_path) -> None:
    sources = write_corpus(tmp_path / "corpus")
    with pytest.raises(FileNotFoundError, match="refinery run"):
        main(tmp_path / "empty", sources=sources, echo=lambda _: None)
    cfg = validate_config(TINY)
    run_chain(tmp_path / "run", sources, cfg, stages=("ingest",))
    time.sleep(0.01)
    graph = build_graph(tmp_path / "run", sources, cfg)
    assert graph.stale_stages() == list(STAGES[1:])
    assert graph.node("stage:dedup").status == "missing"
    assert graph.rerun_command().endswith("--from dedup")


def test_with_no_flags_each_stage_is_judged_by_the_config_it_ran_with(run_root, tmp_path) -> None:
    from refinery.flows.config import load_config

    root, sources, cfg = run_root
    assert build_graph(root, sources, validate_config({}), use_mlflow=False).first_stale() == "filter"  # not defaults
    lines: list[str] = []
    graph = main(root, out_dir=tmp_path, log=False, echo=lines.append)  # no --source, --config or --set
    assert graph.stale_stages() == [] and statuses(graph)["refinery-lm v1"] == "ok"
    assert "Everything is up to date" in lines[0] and "the config each stage ran with" in lines[1]
    recorded = load_config(tmp_path / "config.yaml")  # the recorded config, as a file `refinery run --config` reads
    assert all(getattr(recorded, s) == getattr(cfg, s) for s in STAGES)


def test_set_judges_against_that_config_and_marks_its_stage_and_downstream_stale(run_root, tmp_path) -> None:
    import yaml

    from refinery.flows.lineage_graph import config_tree, recorded_config

    root, sources, _ = run_root
    recorded = tmp_path / "recorded.yaml"  # what `refinery lineage` writes to <out>/config.yaml
    recorded.write_text(yaml.safe_dump(config_tree(recorded_config(RunLayout.at(root)))))
    change = "filter.gopher_quality.min_words=80"
    graph = main(root, config_file=recorded, overrides=[change], out_dir=tmp_path, log=False, echo=lambda _: None)
    assert graph.stale_stages() == ["filter", "tokenizer", "shards", "train", "eval"]
    assert graph.node("stage:filter").reasons == ["config changed"]
    assert graph.node("stage:tokenizer").reasons == ["upstream stage filter is stale"]
    assert graph.rerun_command().endswith(f"--config {recorded} --set {change} --root {root} --from filter")
    # --set alone starts from the defaults, as `refinery run --set` does: the same stages, for more reasons
    alone = main(root, overrides=[change], out_dir=tmp_path, log=False, echo=lambda _: None)
    assert alone.stale_stages() == ["filter", "tokenizer", "shards", "train", "eval"]


def test_a_held_root_lock_is_no_stage_output(run_root, tmp_path) -> None:
    from refinery.storage.lock import LOCK_NAME, RootLock

    root = run_root[0]
    with RootLock(root).held(0):
        assert (root / LOCK_NAME).read_text()  # the holder's record
        catalog = PIPELINE.catalog(root)
        assert {"ingest", "dedup", "filter"} <= set(catalog.views)
        assert "ingest" in catalog.format(catalog.overview_sql())
        assert main(root, out_dir=tmp_path, log=False, echo=lambda _: None).stale_stages() == []


def test_sources_come_from_this_roots_last_run_that_read_them(run_root) -> None:
    from mlflow.tracking import MlflowClient

    from refinery.flows.lineage_graph import recorded_sources

    root, sources, cfg = run_root
    layout = RunLayout.at(root)
    client = MlflowClient(tracking_uri=layout.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("refinery").experiment_id
    other = client.create_run(exp, tags={"refinery.kind": "pipeline", "refinery.root": "/elsewhere"})
    client.log_param(other.info.run_id, "sources", "/elsewhere/corpus")
    later = client.create_run(exp, tags={"refinery.kind": "pipeline", "refinery.root": str(layout.root)})
    client.log_param(later.info.run_id, "sources", "/the/bundled/sample")
    client.log_param(later.info.run_id, "stages", "filter")  # a run that read no sources
    assert recorded_sources(layout, cfg) == sources
