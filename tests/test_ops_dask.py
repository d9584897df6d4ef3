"""Scale-out: `execution.executor: dask` runs the CPU-heavy maps on Dask workers, with identical outputs.

A real `distributed.LocalCluster` with two worker processes stands in for an
existing cluster: the pipeline connects to it by address (through prefect-dask's
`DaskTaskRunner`), exactly as it would to a remote scheduler. The curation and
tokenization stages then run once in-process and once on the cluster, and every
output file's checksum, every count and every manifest digest must agree. The
workers' own counters prove the batches really ran there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refinery.sample_corpus import build_sample_corpus
from refinery.storage.manifest import read_manifest

pytestmark = pytest.mark.slow

MAPPED_STAGES = ["ingest", "dedup", "filter", "tokenizer", "shards"]
TINY = """
tokenizer:
  vocab_size: 512
shards:
  val_fraction: 0.15
execution:
  progress: false
"""


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k.startswith("PREFECT_SERVER_")}
    env["PREFECT_HOME"] = str(root / "prefect")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# One process runs the flow three ways, so Prefect's temporary server starts once.
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from refinery.flows.env import configure_environment

    base, corpus, config, address, stages = sys.argv[1:]
    configure_environment(base)
    from prefect_dask import DaskTaskRunner

    from refinery.flows.config import load_config
    from refinery.flows.pipeline import data_to_model

    cfg = load_config(Path(config), [])
    runs = {
        "local": (data_to_model, {}),
        # the pipeline connects to the cluster by address (execution.dask_address) ...
        "dask": (data_to_model, {"executor": "dask", "dask_address": address}),
        # ... or uses the cluster of the flow's own DaskTaskRunner
        "runner": (data_to_model.with_options(task_runner=DaskTaskRunner(address=address)), {"executor": "dask"}),
    }
    for name, (flow, execution) in runs.items():
        config = cfg.model_dump(mode="json")
        config["execution"].update(execution)
        flow(sources=[corpus], root=str(Path(base) / name), config=config, stages=stages.split(","))
    """
)


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c, Client(c, set_as_default=False) as client:
        # not the default client: prefect-dask would prefer a process-global client over any address
        yield c.scheduler_address, client


def test_dask_cluster_gives_the_same_outputs_as_in_process(tmp_path: Path, cluster) -> None:
    address, client = cluster
    corpus = build_sample_corpus(tmp_path / "corpus", size="tiny").root
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    before = client.run(lambda dask_worker: dask_worker.state.executed_count)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(corpus), str(config), address, ",".join(MAPPED_STAGES)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"

    for run in ("dask", "runner"):
        for stage in MAPPED_STAGES:
            local, other = read_manifest(tmp_path / "local" / stage), read_manifest(tmp_path / run / stage)
            assert local is not None and other is not None, (run, stage)
            assert [(o.path, o.rows, o.sha256) for o in other.outputs] == [
                (o.path, o.rows, o.sha256) for o in local.outputs
            ], (run, stage)
            assert other.counts == local.counts, (run, stage)
            assert other.output_digest == local.output_digest, (run, stage)

    # The per-batch work ran on both worker processes ...
    after = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(after) == 2 and all(after[w] > before.get(w, 0) for w in after), (before, after)
    # ... for every mapped stage: parsing, MinHash signatures, quality signals, encoding.
    prefixes = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert {"parse_batch", "signature_batch", "signals_batch", "encode_row_group"} <= prefixes, prefixes


def test_unreachable_scheduler_fails_with_a_message_naming_the_setting() -> None:
    import dask

    from refinery.flows.config import validate_config
    from refinery.flows.pipeline import _make_executor

    cfg = validate_config({"execution": {"executor": "dask", "dask_address": "tcp://127.0.0.1:9"}})
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(RuntimeError, match="execution.dask_address"):
            _make_executor(cfg)
