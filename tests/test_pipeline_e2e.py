"""The whole pipeline, as a user runs it: `refinery run` on the tiny sample corpus.

Checks, through the real CLI, Prefect and MLflow:
- every stage completes, counts add up (in == kept + dropped by reason), and the
  dropped/quarantine tables hold exactly the dropped documents;
- the digest chain is unbroken from the ingest manifest to the registered model;
- MLflow holds a parent run, one nested run per stage with datasets and manifest,
  and the registered model; Prefect shows the flow run Completed with its task
  runs and artifacts;
- a second run skips every stage; changing one filter threshold re-runs from the
  filter stage on, and only from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from refinery.flows.stages import PIPELINE
from refinery.sample_corpus import build_sample_corpus
from refinery.storage.manifest import read_manifest

STAGES = PIPELINE.names

pytestmark = pytest.mark.slow

TINY = """
tokenizer:
  vocab_size: 512
shards:
  val_fraction: 0.15
train:
  preset: test
  seq_len: 64
  micro_batch_size: 16
  tokens_per_step: 2048
  max_steps: 120
  eval_every: 60
  eval_batches: 4
  checkpoint_every: 60
  warmup_steps: 10
  lr: 0.003
eval:
  max_batches: 8
  max_new_tokens: 8
tracking:
  register_poor_models: true  # a few training steps; what is tested is the registration
"""

# A threshold that changes which documents the filter keeps (see test 3).
THRESHOLD_FLAG = "filter.gopher_quality.min_words=120"


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k.startswith("PREFECT_SERVER_")}
    env["PREFECT_HOME"] = str(root / "prefect")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _refinery(root: Path, corpus: Path, config: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "refinery", "run", "--source", str(corpus), "--root", str(root),
           "--config", str(config), *extra]
    proc = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"refinery run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _status_lines(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STAGES and parts[1] in ("ran", "skipped", "failed"):
            out[parts[0]] = parts[1]
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    corpus = build_sample_corpus(base / "corpus", size="tiny").root
    config = base / "tiny.yaml"
    config.write_text(TINY)
    root = base / "run"
    stdout = _refinery(root, corpus, config)
    return root, corpus, config, stdout


def test_first_run_completes_and_beats_unigram(first_run) -> None:
    root, _, _, stdout = first_run
    assert _status_lines(stdout) == {s: "ran" for s in STAGES}
    assert "validation loss" in stdout and "unigram baseline" in stdout
    ev = read_manifest(root / "eval").metrics
    assert ev["val_loss"] < ev["unigram_loss"], ev


def test_counts_add_up_and_dropped_tables_match(first_run) -> None:
    root = first_run[0]
    manifests = {s: read_manifest(root / s) for s in STAGES}
    for stage, m in manifests.items():
        assert m is not None, stage
        assert m.counts.in_ == m.counts.kept + m.counts.dropped_total, stage
    # each stage's input is the previous stage's kept documents
    for a, b in [("ingest", "dedup"), ("dedup", "filter"), ("filter", "tokenizer"), ("filter", "shards")]:
        assert manifests[b].counts.in_ == manifests[a].counts.kept, (a, b)
    quarantine = pq.read_table(root / "ingest" / "quarantine.parquet").to_pylist()
    assert len(quarantine) == manifests["ingest"].counts.dropped_total
    assert {q["reason"] for q in quarantine} == set(manifests["ingest"].counts.dropped)
    for stage in ("dedup", "filter"):
        dropped = pq.read_table(root / stage / "dropped.parquet").to_pylist()
        by_reason: dict[str, int] = {}
        for row in dropped:
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
        assert by_reason == manifests[stage].counts.dropped, stage
    # `refinery inspect`'s dropped view sees every dropped document of the document stages
    seen = dict(PIPELINE.catalog(root).query("select stage, count(*) from dropped group by 1").fetchall())
    assert seen == {s: manifests[s].counts.dropped_total for s in ("ingest", "dedup", "filter") if manifests[s].counts.dropped_total}
    # provenance: training tokens per source file add up to the shards' training tokens
    tokens = PIPELINE.catalog(root).query("select sum(tokens) from provenance").fetchall()[0][0]
    assert tokens == manifests["shards"].extra["train_tokens"]
    # the planted duplicates and low-quality documents gave every curation stage work
    assert manifests["ingest"].counts.dropped_total > 0
    assert manifests["dedup"].counts.dropped.get("exact_duplicate", 0) > 0
    assert manifests["dedup"].counts.dropped.get("near_duplicate", 0) > 0
    assert manifests["filter"].counts.dropped_total > 0


def test_digest_chain_and_mlflow_lineage(first_run) -> None:
    from mlflow.tracking import MlflowClient

    root = first_run[0]
    from refinery.flows.graph import input_digest

    manifests = [read_manifest(root / s) for s in STAGES]
    digests = {m.stage: m.output_digest for m in manifests}
    for m in manifests[1:]:  # each stage's input digest is made of the output digests of the stages it reads
        assert m.input_digest == input_digest(PIPELINE[m.stage], digests), m.stage
    assert manifests[1].input_digest == manifests[0].output_digest  # one input: its digest, a hash chain

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("refinery")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("refinery.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["refinery.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    for m in manifests:
        run = client.get_run(children[m.stage].info.run_id)
        assert run.data.tags["refinery.input_digest"] == m.input_digest
        assert run.data.tags["refinery.output_digest"] == m.output_digest
        assert run.data.metrics["docs_in"] == m.counts.in_
        contexts = {
            next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset.digest for d in run.inputs.dataset_inputs
        }
        assert contexts == {"input": m.input_digest[:32], "output": m.output_digest[:32]}
        assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
        system = {k for k in run.data.metrics if k.startswith("system/")}  # MLflow's own system-metrics logging
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, m.stage
    train_run = client.get_run(children["train"].info.run_id)
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) >= 10

    versions = client.search_model_versions("name = 'refinery-lm'")
    assert len(versions) == 1
    mv = versions[0]
    assert mv.run_id == train_run.info.run_id
    assert mv.tags["refinery.output_digest"] == manifests[STAGES.index("train")].output_digest


def test_registered_model_generates_through_pyfunc(first_run) -> None:
    import mlflow

    from refinery.storage.layout import fluent_tracking

    root = first_run[0]
    with fluent_tracking(f"sqlite:///{root / 'mlflow.db'}"):  # restored after: no store leaks into later tests
        model = mlflow.pyfunc.load_model("models:/refinery-lm/1")
    out = model.predict(["def "], params={"max_new_tokens": 5})
    assert len(out) == 1 and isinstance(out[0], str)


def test_cli_generate_streams_the_same_text_eager_and_compiled(first_run) -> None:
    root = first_run[0]

    def generate(*extra: str) -> str:
        cmd = [sys.executable, "-m", "refinery", "generate", "def ", "--root", str(root),
               "--max-new-tokens", "12", "--temperature", "0", *extra]
        proc = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    eager = generate()
    assert eager.startswith("def ") and len(eager.rstrip("\n")) > len("def ")  # a tiny model may emit spaces
    import torch

    from refinery.model.generate import compile_unavailable

    if reason := compile_unavailable(torch.device("cpu")):
        pytest.skip(f"{reason}; the eager path was checked")
    assert generate("--compile") == eager


def test_prefect_records_the_flow_run(first_run) -> None:
    root = first_run[0]
    script = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        flows = await c.read_flow_runs()
        tasks = await c.read_task_runs()
        arts = await c.read_artifacts()
        names = {t.id: t.name for t in tasks}
        upstream = {t.name: sorted(names[i.id] for v in t.task_inputs.values() for i in v if hasattr(i, "id"))
                    for t in tasks}
        print(json.dumps({"flows": [[f.name, f.state.name, str(f.flow_id)] for f in flows],
                          "tasks": [[t.name, t.state.name, str(t.flow_run_id)] for t in tasks],
                          "upstream": upstream, "artifacts": [a.key for a in arts if a.key]}))
asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [f[1] for f in data["flows"]] == ["Completed"]
    task_names = sorted(t[0].rsplit("-", 1)[0] for t in data["tasks"])
    assert task_names == sorted(STAGES)
    assert all(t[1] == "Completed" for t in data["tasks"])
    assert {f"{s}-report" for s in STAGES} <= set(data["artifacts"])
    # Prefect's graph is the data graph: each stage task's upstream task runs are exactly its declared inputs.
    stage_of = {task: task.rsplit("-", 1)[0] for task in data["upstream"]}
    for task, upstream in data["upstream"].items():
        assert sorted(stage_of[u] for u in upstream) == sorted(PIPELINE[stage_of[task]].inputs), (task, upstream)


def test_second_run_skips_and_threshold_change_reruns_from_filter(first_run) -> None:
    root, corpus, config, _ = first_run
    before = {s: read_manifest(root / s) for s in STAGES}
    second = _refinery(root, corpus, config)
    assert _status_lines(second) == {s: "skipped" for s in STAGES}
    assert {s: read_manifest(root / s).created_at for s in STAGES} == {s: m.created_at for s, m in before.items()}

    third = _refinery(root, corpus, config, "--set", THRESHOLD_FLAG)
    status = _status_lines(third)
    assert status == {**{s: "skipped" for s in ("ingest", "dedup")}, **{s: "ran" for s in STAGES[2:]}}, status
    after = read_manifest(root / "filter")
    assert after.counts.kept < before["filter"].counts.kept
    assert after.input_digest == before["dedup"].output_digest


def test_finetune_adapts_the_registered_model(first_run, tmp_path) -> None:
    """LoRA on a domain folder: the base checkpoint is untouched, a new version is registered with lineage."""
    import shutil

    from mlflow.tracking import MlflowClient

    from refinery.storage.manifest import file_sha256

    root, corpus, _, _ = first_run
    domain = tmp_path / "domain"
    shutil.copytree(corpus / "code", domain)
    base_weights = root / "train" / read_manifest(root / "train").extra["checkpoint_dir"] / "model.safetensors"
    before = file_sha256(base_weights)
    cmd = [sys.executable, "-m", "refinery", "finetune", "--base", "models:/refinery-lm/1", "--source", str(domain),
           "--root", str(root), "--set", "train.max_steps=20", "--set", "train.eval_every=10",
           "--set", "data.shards.val_fraction=0.2"]
    proc = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "models:/refinery-lm-finetuned/1" in proc.stdout
    assert file_sha256(base_weights) == before

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    mv = client.get_model_version("refinery-lm-finetuned", "1")
    domain_shards = read_manifest(root / "finetune" / "domain" / "data" / "shards")
    assert mv.tags["refinery.base_model"] == "models:/refinery-lm/1"
    assert mv.tags["refinery.domain_digest"] == domain_shards.output_digest
    base = client.get_model_version("refinery-lm", "1")
    assert mv.tags["refinery.base_input_digest"] == base.tags["refinery.input_digest"]
    run = client.get_run(mv.run_id)
    assert run.data.tags["refinery.kind"] == "finetune"
    contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs}
    assert contexts == {"base_model", "training"}
