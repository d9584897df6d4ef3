"""MLflow lineage: one parent run per pipeline run, one nested run per stage.

Everything goes through an explicit `MlflowClient` and run ids rather than
MLflow's thread-local "active run", because stages run inside Prefect task
threads (or on Dask workers) where that state is not shared.

Each nested run records the stage config as params, counts and throughput as
metrics, the manifest as an artifact, and its input and output datasets with
their digests (`mlflow.log_input`'s dataset records), so the experiment
browser shows which data made which model. Digests in MLflow's dataset table
are capped at 36 characters; the full 64-hex digests are kept as tags.

Every run carries the pid and host of the process that made it, so that runs a
killed process left RUNNING are marked KILLED when the next pipeline run starts
on the same store and experiment (`close_abandoned_runs`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from refinery.storage.layout import fluent_tracking
from refinery.storage.manifest import Manifest

log = logging.getLogger(__name__)

DIGEST_LEN = 32
METRICS_FLUSH_S = 5.0  # how often a stage's per-step metrics reach the tracking store
# MLflow 3's experiment type; the UI opens a `custom_model_development` experiment on its runs (not GenAI traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


PARENT_TAGS = ("refinery.init_from", "refinery.parent_model", "refinery.parent_output_digest")


def parent_tags(init_from: Any) -> dict[str, str]:
    """Tags naming the model a continued training run started from (the train manifest's `extra["init_from"]`).

    `refinery.parent_model` is `NAME/VERSION` when it was a registered model; `refinery.parent_output_digest`
    the output digest of the train stage that made the parent, where known. Nothing for a run from scratch.
    """
    if not isinstance(init_from, dict) or init_from.get("kind") in (None, "scratch"):
        return {}
    tags = {"refinery.init_from": str(init_from.get("uri") or init_from["kind"])}
    if init_from.get("kind") == "model":
        tags["refinery.parent_model"] = f"{init_from.get('name')}/{init_from.get('version')}"
    if init_from.get("output_digest"):
        tags["refinery.parent_output_digest"] = str(init_from["output_digest"])
    return tags


def _process_tags() -> dict[str, str]:
    """Which process made a run, so a later run can tell whether that process is gone."""
    return {"refinery.pid": str(os.getpid()), "refinery.host": socket.gethostname()}


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def flatten(prefix: str, obj: Any) -> dict[str, str]:
    """Nested config -> flat `a.b.c` params, values as MLflow-sized strings."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, (list, dict)) else str(obj)
    return {k: v[:6000] for k, v in out.items()}


class Lineage:
    """Writes the pipeline's lineage into one MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # An embedded (SQLite) store keeps artifacts inside the run root; a tracking server decides
            # for itself (e.g. MinIO behind `mlflow server --artifacts-destination s3://...`).
            location = None
            if not tracking_uri.startswith(("http://", "https://", "databricks")):
                location = str(artifact_root if "://" in str(artifact_root) else Path(artifact_root).resolve().as_uri())
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # experiments made before the tag; a kind set by hand stays
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.parent_run_id: str | None = None

    # -- runs -----------------------------------------------------------------
    def close_abandoned_runs(self) -> list[str]:
        """Mark KILLED the pipeline and stage runs left RUNNING by a process of this host that no longer exists.

        A killed process (SIGKILL, a lost machine) cannot end its runs, which would show as running forever.
        Runs without the pid tags, or made on another host, are left alone: nothing here can tell whether their
        process is still at work. Returns the run ids marked.
        """
        host = socket.gethostname()
        marked = []
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                       max_results=1000)
        for run in runs:
            tags = run.data.tags
            pid = tags.get("refinery.pid", "")
            if tags.get("refinery.kind") not in ("pipeline", "stage") or tags.get("refinery.host") != host:
                continue
            if not pid.isdigit() or _process_exists(int(pid)):
                continue
            self.client.set_tag(run.info.run_id, "refinery.error",
                                f"process {pid} on {host} ended without closing this run; marked KILLED by the next run")
            self.client.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
        return marked

    def start_pipeline(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        self.close_abandoned_runs()
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"refinery.kind": "pipeline", **_process_tags(), **tags}
        )
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, params)
        return self.parent_run_id

    def end_pipeline(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    def start_stage(self, stage: str) -> str:
        tags = {MLFLOW_RUN_NAME: stage, "refinery.stage": stage, "refinery.kind": "stage", **_process_tags()}
        if self.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        return run.info.run_id

    def finish_stage(
        self,
        run_id: str,
        manifest: Manifest,
        input_sources: list[str],
        output_source: str,
        skipped: bool,
        artifacts: list[Path] | None = None,
        status: str = "FINISHED",
    ) -> None:
        """Log a completed (or skipped) stage: params, counts, datasets, manifest."""
        self._log_params(run_id, flatten("", manifest.config))
        metrics = {
            "docs_in": manifest.counts.in_,
            "docs_kept": manifest.counts.kept,
            "docs_dropped": manifest.counts.dropped_total,
            **{f"dropped.{k}": v for k, v in manifest.counts.dropped.items()},
            **{f"seconds.{k}": v for k, v in manifest.timings.items()},
            **{k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float))},
        }
        self.log_metrics(run_id, metrics, step=0)
        self.client.log_batch(
            run_id,
            tags=[
                RunTag("refinery.skipped", str(skipped).lower()),
                RunTag("refinery.input_digest", manifest.input_digest),
                RunTag("refinery.output_digest", manifest.output_digest),
                RunTag("refinery.config_hash", manifest.config_hash),
                *[RunTag(k, v) for k, v in parent_tags(manifest.extra.get("init_from")).items()],
            ],
        )
        self.log_dataset(run_id, f"{manifest.stage}-input", input_sources, manifest.input_digest, "input")
        self.log_dataset(run_id, f"{manifest.stage}-output", [output_source], manifest.output_digest, "output")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.json"
            path.write_text(manifest.model_dump_json(indent=2, by_alias=True))
            self.client.log_artifact(run_id, str(path))
        for art in artifacts or []:
            if Path(art).is_file():
                self.client.log_artifact(run_id, str(art))
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def system_metrics(self, run_id: str, interval_s: float | None) -> Iterator[None]:
        """Log MLflow's system metrics (`system/...`) to a run while the block runs; off when `interval_s` is None.

        MLflow's monitor logs one aggregate per interval, so a stage shorter than
        the interval would log nothing; one last sample is taken when the block
        ends, so every stage run's "System metrics" tab has at least one point.
        """
        if interval_s is None:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # four INFO lines a stage otherwise
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as exc:  # metrics about the machine must never fail a stage
                log.warning("could not log system metrics for run %s: %s", run_id, exc)

    def fail_stage(self, run_id: str, error: str) -> None:
        self.client.set_tag(run_id, "refinery.error", error[:5000])
        self.client.set_terminated(run_id, status="FAILED")

    @contextmanager
    def buffered_metrics(
        self, run_id: str, flush_s: float = METRICS_FLUSH_S
    ) -> Iterator[Callable[[int, dict[str, float]], None]]:
        """A `(step, metrics)` callback that logs to `run_id` in batches, at most every `flush_s` seconds
        (and once more on exit): a training step logged one call at a time costs a database write each,
        tens of milliseconds on a small CPU model's step of a few hundred."""
        import time

        pending: list[Metric] = []
        last = time.monotonic()

        def flush() -> None:
            nonlocal last
            for i in range(0, len(pending), 900):
                self.client.log_batch(run_id, metrics=pending[i : i + 900])
            pending.clear()
            last = time.monotonic()

        def log(step: int, metrics: dict[str, float]) -> None:
            ts = int(time.time() * 1000)
            pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None)
            if time.monotonic() - last >= flush_s:
                flush()

        try:
            yield log
        finally:
            flush()

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

    # -- model ------------------------------------------------------------------
    def log_and_register_model(
        self,
        run_id: str,
        checkpoint_dir: Path,
        tokenizer_file: Path,
        registered_name: str,
        description: str,
    ) -> tuple[str, str]:
        """Log the checkpoint and tokenizer as an MLflow pyfunc model; register a new version.

        Returns (model_uri, version).
        """
        from refinery.serving.mlflow_model import log_pyfunc_model

        with fluent_tracking(self.tracking_uri):
            with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id):
                info = log_pyfunc_model(checkpoint_dir, tokenizer_file)
            run_tags = self.client.get_run(run_id).data.tags
            parent = {k: v for k, v in run_tags.items() if k in PARENT_TAGS}  # a continued model names its parent
            version = mlflow.register_model(info.model_uri, registered_name,
                                            tags={"refinery.train_run": run_id, **parent})
        self.client.update_model_version(registered_name, version.version, description=description)
        return info.model_uri, str(version.version)

    # -- helpers ----------------------------------------------------------------
    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k[:250], v) for k, v in sorted(params.items())]
        existing = self.client.get_run(run_id).data.params
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])

    def log_dataset(self, run_id: str, name: str, sources: list[str], digest: str, context: str) -> None:
        """Record a dataset (by source URI and digest) as an input of a run, under a context such as `input`."""
        source_uri = sources[0] if len(sources) == 1 else os.path.commonpath(sources) if sources else "unknown"
        try:
            source = resolve_dataset_source(source_uri)
        except Exception:  # noqa: BLE001 - any URI MLflow cannot resolve is still recorded by name
            source = resolve_dataset_source(Path(".").resolve().as_uri())
        dataset = MetaDataset(source=source, name=name, digest=digest[:DIGEST_LEN])
        tags = [InputTag("mlflow.data.context", context), InputTag("refinery.digest", digest)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])
