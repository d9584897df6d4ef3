"""The `data_to_model` Prefect flow: every stage in order, each a task with its own MLflow run.

The flow is deliberately thin. For each stage it: works out the stage's input
digest (the previous manifest's output digest), skips the stage when its last
manifest has the same input digest and config hash and its outputs are intact,
otherwise calls the stage function from `refinery.tasks`, writes the manifest
last, publishes a Prefect artifact and logs a nested MLflow run.
"""

from __future__ import annotations

import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from refinery import __version__
from refinery.flows.config import PipelineConfig, validate_config
from refinery.flows.lineage import Lineage
from refinery.storage.atomic import sweep_temporaries
from refinery.storage.documents import document_files
from refinery.storage.layout import STAGES, RunLayout
from refinery.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    StageResult,
    build_manifest,
    config_hash,
    read_manifest,
    verify_outputs,
    write_manifest,
)

# Chart files a stage may leave for MLflow and the docs.
STAGE_ARTIFACTS = {
    "filter": ["drop_reasons.png"],
    "train": ["loss_curve.png", "metrics.jsonl"],
    "eval": ["metrics.json", "samples.jsonl"],
}


@dataclass
class RunContext:
    """What every stage task needs; built once per flow run."""

    layout: RunLayout
    cfg: PipelineConfig
    lineage: Lineage
    sources: list[str]
    selected: list[str]
    forced: set[str]
    executor: Any = None
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _retry_on_io_error(task: Any, task_run: Any, state: State) -> bool:
    """Retry only transient I/O failures; a bad config or a bug fails at once."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


def _previous(ctx: RunContext, stage: str) -> Manifest:
    """The manifest of the stage before `stage`; it must exist."""
    before = STAGES[STAGES.index(stage) - 1]
    manifest = read_manifest(ctx.layout.stage_dir(before))
    if manifest is None:
        raise RuntimeError(
            f"stage {stage!r} needs the output of stage {before!r}, which has not completed in "
            f"{ctx.layout.root}; run it first (e.g. refinery run --from {before})"
        )
    return manifest


def _report(stage: str, manifest: Manifest, skipped: bool) -> None:
    """A Prefect artifact per stage, so the UI tells the story of the run."""
    c = manifest.counts
    lines = [
        f"## {stage}: {'skipped (inputs and config unchanged)' if skipped else 'completed'}",
        "",
        "| documents in | kept | dropped |",
        "|---:|---:|---:|",
        f"| {c.in_:,} | {c.kept:,} | {c.dropped_total:,} |",
        "",
    ]
    if c.dropped:
        lines += ["| drop reason | documents |", "|---|---:|"]
        lines += [f"| `{r}` | {n:,} |" for r, n in sorted(c.dropped.items(), key=lambda kv: -kv[1])]
        lines.append("")
    shown = {k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float))}
    if shown:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:,.4g} |" for k, v in sorted(shown.items())]
        lines.append("")
    lines.append(f"input digest `{manifest.input_digest[:16]}`, output digest `{manifest.output_digest[:16]}`")
    create_markdown_artifact("\n".join(lines), key=f"{stage}-report", description=f"{stage} stage summary")
    if c.dropped:
        create_table_artifact(
            [{"reason": r, "documents": n} for r, n in sorted(c.dropped.items())],
            key=f"{stage}-drop-reasons",
            description=f"{stage}: dropped documents by reason",
        )


def run_stage(
    ctx: RunContext,
    stage: str,
    stage_cfg: Any,
    input_digest: str,
    input_sources: list[str],
    body: Callable[[Path, str], StageResult],
) -> Manifest | State:
    """Skip-or-run one stage and record it; `body(stage_dir, run_id)` does the work."""
    logger = get_run_logger()
    stage_dir = ctx.layout.stage_dir(stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(stage_dir)
    run_id = ctx.lineage.start_stage(stage)
    if (
        stage not in ctx.forced
        and previous is not None
        and previous.matches(input_digest, config_hash(stage_cfg))
        and verify_outputs(stage_dir, previous)
    ):
        logger.info("%s: skipped, inputs and config unchanged (%s)", stage, stage_dir / MANIFEST_NAME)
        ctx.lineage.finish_stage(run_id, previous, input_sources, str(stage_dir), skipped=True)
        ctx.outcomes[stage] = {"status": "skipped", "run_id": run_id, "seconds": 0.0}
        _report(stage, previous, skipped=True)
        return Completed(name="Cached", message="skipped: inputs and config unchanged", data=previous)

    (stage_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the stage is no longer complete
    sweep_temporaries(stage_dir)
    started = time.perf_counter()
    try:
        result = body(stage_dir, run_id)
        manifest = build_manifest(stage, stage_cfg, input_digest, result, {"total": time.perf_counter() - started})
        write_manifest(stage_dir, manifest)
    except Exception as exc:
        ctx.lineage.fail_stage(run_id, "".join(traceback.format_exception(exc)))
        ctx.outcomes[stage] = {"status": "failed", "run_id": run_id, "error": str(exc)}
        raise
    seconds = manifest.timings["total"]
    artifacts = [stage_dir / name for name in STAGE_ARTIFACTS.get(stage, [])]
    ctx.lineage.finish_stage(run_id, manifest, input_sources, str(stage_dir), skipped=False, artifacts=artifacts)
    ctx.outcomes[stage] = {"status": "ran", "run_id": run_id, "seconds": seconds}
    _report(stage, manifest, skipped=False)
    logger.info(
        "%s: %d in, %d kept, %d dropped in %.1fs", stage, manifest.counts.in_, manifest.counts.kept,
        manifest.counts.dropped_total, seconds,
    )
    return manifest


# -- one task per stage --------------------------------------------------------
STAGE_TASK = dict(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_on_io_error)


@task(name="ingest", **STAGE_TASK)
def ingest_stage(ctx: RunContext) -> Manifest | State:
    from refinery.tasks.ingest import run_ingest, source_digest

    cfg = ctx.cfg.ingest
    digest = source_digest(ctx.sources, cfg)
    return run_stage(
        ctx, "ingest", cfg, digest, ctx.sources,
        lambda d, _: run_ingest(ctx.sources, d, cfg, progress=ctx.cfg.execution.progress, executor=ctx.executor),
    )


def _documents_stage(ctx: RunContext, stage: str, fn: Callable[..., StageResult], cfg: Any) -> Manifest | State:
    """A stage that maps the previous stage's document parts to its own."""
    before = STAGES[STAGES.index(stage) - 1]
    prev = _previous(ctx, stage)
    inputs = document_files(ctx.layout.stage_dir(before))
    return run_stage(
        ctx, stage, cfg, prev.output_digest, [str(ctx.layout.stage_dir(before))],
        lambda d, _: fn(inputs, d, cfg, progress=ctx.cfg.execution.progress, executor=ctx.executor),
    )


@task(name="dedup", **STAGE_TASK)
def dedup_stage(ctx: RunContext) -> Manifest | State:
    from refinery.tasks.dedup import run_dedup

    return _documents_stage(ctx, "dedup", run_dedup, ctx.cfg.dedup)


@task(name="filter", **STAGE_TASK)
def filter_stage(ctx: RunContext) -> Manifest | State:
    from refinery.tasks.filter import run_filter

    return _documents_stage(ctx, "filter", run_filter, ctx.cfg.filter)


@task(name="tokenizer", **STAGE_TASK)
def tokenizer_stage(ctx: RunContext) -> Manifest | State:
    from refinery.tasks.tokenizer import run_train_tokenizer

    prev = _previous(ctx, "tokenizer")
    inputs = document_files(ctx.layout.stage_dir("filter"))
    cfg = ctx.cfg.tokenizer
    return run_stage(
        ctx, "tokenizer", cfg, prev.output_digest, [str(ctx.layout.stage_dir("filter"))],
        lambda d, _: run_train_tokenizer(inputs, d, cfg, progress=ctx.cfg.execution.progress),
    )


@task(name="shards", **STAGE_TASK)
def shards_stage(ctx: RunContext) -> Manifest | State:
    from refinery.tasks.encode import run_encode

    prev = _previous(ctx, "shards")
    tokenizer_file = ctx.layout.stage_dir("tokenizer") / prev.extra.get("tokenizer_file", "tokenizer.json")
    inputs = document_files(ctx.layout.stage_dir("filter"))
    cfg = ctx.cfg.shards
    return run_stage(
        ctx, "shards", cfg, prev.output_digest,
        [str(ctx.layout.stage_dir("filter")), str(tokenizer_file)],
        lambda d, _: run_encode(
            inputs, tokenizer_file, d, cfg, progress=ctx.cfg.execution.progress, executor=ctx.executor
        ),
    )


@task(name="train", cache_policy=NO_CACHE)
def train_stage(ctx: RunContext) -> Manifest | State:
    from refinery.tasks.train import run_train

    prev = _previous(ctx, "train")
    cfg = ctx.cfg.train
    shards_dir = ctx.layout.stage_dir("shards")

    def body(stage_dir: Path, run_id: str) -> StageResult:
        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            ctx.lineage.log_metrics(run_id, metrics, step)

        return run_train(
            shards_dir, prev.extra, prev.counts.kept, stage_dir, cfg,
            run_key=prev.output_digest + config_hash(cfg), on_metrics=on_metrics,
            progress=ctx.cfg.execution.progress,
        )

    return run_stage(ctx, "train", cfg, prev.output_digest, [str(shards_dir)], body)


@task(name="eval", cache_policy=NO_CACHE)
def eval_stage(ctx: RunContext) -> Manifest | State:
    from refinery.tasks.evaluate import run_eval

    prev = _previous(ctx, "eval")
    shards = read_manifest(ctx.layout.stage_dir("shards"))
    tokenizer = read_manifest(ctx.layout.stage_dir("tokenizer"))
    assert shards is not None and tokenizer is not None  # guaranteed by the chain that produced train
    train_dir = ctx.layout.stage_dir("train")
    cfg = ctx.cfg.eval
    return run_stage(
        ctx, "eval", cfg, prev.output_digest, [str(train_dir)],
        lambda d, _: run_eval(
            train_dir / prev.extra["checkpoint_dir"],
            ctx.layout.stage_dir("tokenizer") / tokenizer.extra.get("tokenizer_file", "tokenizer.json"),
            ctx.layout.stage_dir("shards"), shards.extra, shards.counts.kept, d, cfg,
        ),
    )


STAGE_TASKS = {
    "ingest": ingest_stage,
    "dedup": dedup_stage,
    "filter": filter_stage,
    "tokenizer": tokenizer_stage,
    "shards": shards_stage,
    "train": train_stage,
    "eval": eval_stage,
}


def select_stages(stages: list[str] | None, from_stage: str | None) -> tuple[list[str], set[str]]:
    """Which stages run, and which are forced to re-run (`--from` forces its stage and later ones)."""
    for name in [*(stages or []), *([from_stage] if from_stage else [])]:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    if from_stage:
        selected = list(STAGES[STAGES.index(from_stage) :])
        return selected, set(selected)
    return [s for s in STAGES if not stages or s in stages], set()


def _register_model(ctx: RunContext, train: Manifest, evaluation: Manifest | None) -> dict[str, str]:
    """Register the trained model once per distinct training output."""
    name = ctx.cfg.tracking.registered_model
    client = ctx.lineage.client
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("refinery.output_digest") == train.output_digest:
            return {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}"}
    tokenizer = read_manifest(ctx.layout.stage_dir("tokenizer"))
    assert tokenizer is not None
    val = evaluation.metrics.get("val_loss") if evaluation else train.metrics.get("val_loss")
    _, version = ctx.lineage.log_and_register_model(
        ctx.outcomes["train"]["run_id"],
        ctx.layout.stage_dir("train") / train.extra["checkpoint_dir"],
        ctx.layout.stage_dir("tokenizer") / tokenizer.extra.get("tokenizer_file", "tokenizer.json"),
        name,
        description=f"validation loss {val:.4f} nats/token; training data digest {train.input_digest[:16]}",
    )
    client.set_model_version_tag(name, version, "refinery.output_digest", train.output_digest)
    client.set_model_version_tag(name, version, "refinery.input_digest", train.input_digest)
    client.set_model_version_tag(name, version, "refinery.pipeline_run", ctx.lineage.parent_run_id or "")
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}"}


def _make_executor(cfg: PipelineConfig) -> tuple[Any, Callable[[], None]]:
    """None for in-process maps, or an executor whose maps run on Dask workers, and how to close it.

    With `execution.executor: dask` the cluster comes from prefect-dask's `DaskTaskRunner`: the
    flow's own runner when it was started with one (`data_to_model.with_options(task_runner=...)`),
    else one built here, connected to `execution.dask_address` or, without an address, starting a
    local cluster of two worker processes. The stages get a `distributed` client's executor, so their
    per-batch maps (parsing, signatures, filter signals, encoding) run on the workers; everything else
    (reading manifests, writing outputs) stays in this process.
    """
    if cfg.execution.executor == "local":
        return None, lambda: None
    from contextlib import ExitStack

    from distributed import Client
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    stack = ExitStack()
    flow_ctx = FlowRunContext.get()
    runner = flow_ctx.task_runner if flow_ctx is not None else None
    try:
        if not isinstance(runner, DaskTaskRunner):
            address = cfg.execution.dask_address
            runner = stack.enter_context(
                DaskTaskRunner(address=address)
                if address
                else DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
            )
        scheduler = runner.client.scheduler.address
        client = stack.enter_context(Client(scheduler, set_as_default=False))
    except Exception as exc:
        stack.close()
        raise RuntimeError(
            f"could not reach the Dask scheduler ({cfg.execution.dask_address or 'local cluster'}): {exc}; "
            "check execution.dask_address (e.g. tcp://10.0.0.5:8786), or set execution.executor=local"
        ) from exc
    return client.get_executor(), stack.close


@flow(name="data_to_model", log_prints=True)
def data_to_model(
    sources: list[str],
    root: str = ".refinery",
    config: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Raw documents to a trained, evaluated and registered model. Returns a summary."""
    cfg = validate_config(config or {})
    layout = RunLayout.at(root)
    layout.create()
    selected, forced = select_stages(stages, from_stage)
    if force:
        forced = set(selected)
    tracking_uri = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or layout.mlflow_tracking_uri
    lineage = Lineage(tracking_uri, cfg.tracking.experiment, layout.mlflow_artifacts)
    from prefect.runtime import flow_run

    parent = lineage.start_pipeline(
        name=f"data_to_model {flow_run.get_name() or ''}".strip(),
        params={"sources": ",".join(sources), "root": str(layout.root), "stages": ",".join(selected)},
        tags={
            "refinery.version": __version__,
            "refinery.root": str(layout.root),
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "host.python": platform.python_version(),
        },
    )
    executor, close_executor = _make_executor(cfg)
    ctx = RunContext(layout, cfg, lineage, sources, selected, forced, executor)
    summary: dict[str, Any] = {"root": str(layout.root), "mlflow_run_id": parent, "stages": {}}
    status = "FAILED"
    try:
        manifests: dict[str, Manifest] = {}
        for stage in selected:
            out = STAGE_TASKS[stage](ctx)
            manifest = out.result() if isinstance(out, State) else out
            manifests[stage] = manifest
            summary["stages"][stage] = {
                **ctx.outcomes[stage],
                "in": manifest.counts.in_,
                "kept": manifest.counts.kept,
                "dropped": manifest.counts.dropped,
                "metrics": manifest.metrics,
            }
        train = manifests.get("train") or read_manifest(layout.stage_dir("train"))
        if "train" in selected and train is not None:
            evaluation = manifests.get("eval") or read_manifest(layout.stage_dir("eval"))
            summary["model"] = _register_model(ctx, train, evaluation)
            from refinery.flows.lineage_graph import record_provenance

            mv = lineage.client.get_model_version(summary["model"]["name"], summary["model"]["version"])
            summary["provenance"] = str(record_provenance(layout, sources, lineage.client, mv.run_id))
        if "eval" in manifests:
            lineage.log_metrics(parent, manifests["eval"].metrics, step=0)
        status = "FINISHED"
        return summary
    finally:
        close_executor()
        lineage.end_pipeline(status)
