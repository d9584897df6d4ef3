"""The `data_to_model` Prefect flow: the stage graph of flows/stages.py, one task per stage.

The flow is deliberately thin: it walks the declared graph and hands each
stage's task the typed outputs of the stages it reads. Every task runs the same
body (`run_stage`): it works out the stage's input digest, skips the stage when
nothing changed (`flows.graph.staleness`), otherwise calls the stage's declared
function, writes the manifest last, publishes a Prefect artifact and logs a
nested MLflow run.
"""

from __future__ import annotations

import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from refinery import __version__
from refinery.flows.config import validate_config
from refinery.flows.graph import Graph, Stage, StageCall, active, input_digest, staleness
from refinery.flows.lineage import Lineage
from refinery.storage.atomic import sweep_temporaries
from refinery.storage.layout import RunLayout
from refinery.storage.lock import RootLock, RootLocked, describe_holder
from refinery.storage.manifest import MANIFEST_NAME, Manifest, build_manifest, read_manifest, write_manifest
from refinery.storage.outputs import Checkpoint, Documents, Evaluation, StageOutput, TokenizerFile


@dataclass
class RunEnv:
    """What every stage task shares; built once per flow run.

    It reaches the tasks `quote`d, so Prefect does not read it as data: the
    only upstreams Prefect records for a stage are the outputs it reads.
    """

    graph: Graph
    layout: RunLayout
    cfg: Any
    lineage: Lineage
    sources: list[str]
    forced: set[str]
    executor: Any = None
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)


class EmptyStageOutput(RuntimeError):
    """A stage kept no documents, so the stages that read it have nothing to work on: the run stops there."""


def empty_output_message(stage: str, manifest: Manifest, readers: list[str]) -> str:
    """Which stage emptied the corpus and why (its drop reasons; ingest's are its quarantine reasons)."""
    c = manifest.counts
    what = "quarantined" if stage == "ingest" else "dropped"
    reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(c.dropped.items(), key=lambda kv: -kv[1]))
    why = f" ({what}: {reasons})" if reasons else ""
    return (
        f"stage {stage!r} kept 0 of {c.in_:,} documents{why}; nothing is left for {', '.join(map(repr, readers))}. "
        f"Check the sources or loosen the {stage!r} config, then run again."
    )


def _retry_on_io_error(task: Any, task_run: Any, state: State) -> bool:
    """Retry only transient I/O failures; a bad config or a bug fails at once."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


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


def run_stage(env: RunEnv, name: str, inputs: dict[str, StageOutput]) -> StageOutput | State:
    """Skip-or-run one stage and record it: the body of every stage's Prefect task.

    The stage is skipped when `staleness` finds nothing to redo; otherwise its
    function runs, the manifest is written last, and a Prefect artifact and a
    nested MLflow run record it. Returns the stage's typed output.
    """
    logger = get_run_logger()
    stage = env.graph[name]
    cfg = getattr(env.cfg, name)
    stage_dir = env.layout.stage_dir(name)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if stage.reads_sources is not None:
        digest = stage.reads_sources(env.sources, cfg)
        read = list(env.sources)
    else:
        digest = input_digest(stage, {i: out.digest for i, out in inputs.items()})
        read = [str(out.dir) for out in inputs.values()]
    previous = read_manifest(stage_dir)
    run_id = env.lineage.start_stage(name)
    stale = staleness(stage, stage_dir, previous, digest, cfg, env.cfg.execution.verify)
    if name not in env.forced and previous is not None and not stale:
        logger.info("%s: skipped, inputs and config unchanged (%s)", name, stage_dir / MANIFEST_NAME)
        env.lineage.finish_stage(run_id, previous, read, str(stage_dir), skipped=True)
        env.outcomes[name] = {"status": "skipped", "run_id": run_id, "seconds": 0.0, "manifest": previous}
        _report(name, previous, skipped=True)
        output = stage.output.from_manifest(stage_dir, previous)
        return Completed(name="Cached", message="skipped: inputs and config unchanged", data=output)

    if previous is not None:
        logger.info("%s: re-running (%s)", name, "forced" if name in env.forced else "; ".join(stale))
    (stage_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the stage is no longer complete
    sweep_temporaries(stage_dir)
    started = time.perf_counter()
    try:
        with env.lineage.system_metrics(run_id, env.cfg.tracking.system_metrics_s), \
                env.lineage.buffered_metrics(run_id) as on_metrics:  # fmt: skip
            call = StageCall(
                dir=stage_dir, cfg=cfg, inputs=inputs, input_digest=digest, sources=list(env.sources),
                progress=env.cfg.execution.progress, executor=env.executor, on_metrics=on_metrics,
                tracking_uri=env.lineage.tracking_uri, code_version=stage.code_version,
            )
            result = stage.run(call)
        manifest = build_manifest(
            name, cfg, digest, result, {"total": time.perf_counter() - started}, code_version=stage.code_version
        )
        write_manifest(stage_dir, manifest)
    except Exception as exc:
        env.lineage.fail_stage(run_id, "".join(traceback.format_exception(exc)))
        env.outcomes[name] = {"status": "failed", "run_id": run_id, "error": str(exc)}
        raise
    seconds = manifest.timings["total"]
    artifacts = [stage_dir / f for f in stage.artifacts]
    env.lineage.finish_stage(run_id, manifest, read, str(stage_dir), skipped=False, artifacts=artifacts)
    env.outcomes[name] = {"status": "ran", "run_id": run_id, "seconds": seconds, "manifest": manifest}
    _report(name, manifest, skipped=False)
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(manifest.counts.dropped.items(), key=lambda x: -x[1]))
    logger.info(
        "%s: %d in, %d kept, %d dropped%s in %.1fs", name, manifest.counts.in_, manifest.counts.kept,
        manifest.counts.dropped_total, f" ({reasons})" if reasons else "", seconds,
    )
    return stage.output.from_manifest(stage_dir, manifest)


def stage_task(stage: Stage) -> Task:
    """The Prefect task of a stage: named after it, retried on transient I/O errors where declared."""
    options: dict[str, Any] = {"name": stage.name, "cache_policy": NO_CACHE}
    if stage.retry_io:
        options.update(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_on_io_error)
    return task(**options)(run_stage)


def completed_output(layout: RunLayout, stage: Stage, reader: str) -> StageOutput:
    """The output of `stage` completed in an earlier run, for a `reader` that runs without it."""
    output = stage.output.read(layout.stage_dir(stage.name))
    if output is None:
        raise RuntimeError(
            f"stage {reader!r} needs the output of stage {stage.name!r}, which has not completed in "
            f"{layout.root}; run it first (e.g. refinery run --from {stage.name})"
        )
    return output


def select_stages(stages: list[str] | None, from_stage: str | None) -> tuple[list[str], set[str]]:
    """Which stages run, and which are forced to re-run (`--from` forces its stage and the stages that read it)."""
    return active().select(stages, from_stage)


def _register_model(env: RunEnv, model: Checkpoint, tokenizer: TokenizerFile, val_loss: float | None) -> dict[str, str]:
    """Register the trained model once per distinct training output."""
    name = env.cfg.tracking.registered_model
    client = env.lineage.client
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("refinery.output_digest") == model.digest:
            return {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}"}
    train = env.outcomes[model.stage]["manifest"]
    loss = f"validation loss {val_loss:.4f} nats/token; " if val_loss is not None else ""
    _, version = env.lineage.log_and_register_model(
        env.outcomes[model.stage]["run_id"], model.checkpoint_dir, tokenizer.file, name,
        description=f"{loss}training data digest {train.input_digest[:16]}",
    )
    client.set_model_version_tag(name, version, "refinery.output_digest", model.digest)
    client.set_model_version_tag(name, version, "refinery.input_digest", train.input_digest)
    client.set_model_version_tag(name, version, "refinery.pipeline_run", env.lineage.parent_run_id or "")
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}"}


def _quality_warning(cfg: Any, evaluation: Evaluation) -> str | None:
    """The eval stage's verdict on the model (`poor_model_warning`), with its section's margin."""
    from refinery.tasks.evaluate import poor_model_warning

    section = getattr(cfg, evaluation.stage, None)
    return poor_model_warning(evaluation.metrics, getattr(section, "min_gain_over_unigram", None))


def local_executor(workers: int) -> tuple[Any, Callable[[], None]]:
    """None (maps in this process) for one worker; else a pool of `workers` spawned processes, and its shutdown.

    Spawned rather than forked: the flow's process runs threads (Prefect's server and clients), and a fork
    copies their locks in whatever state they are in.
    """
    if workers <= 1:
        return None, lambda: None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return pool, lambda: pool.shutdown(cancel_futures=True)


def _make_executor(cfg: Any) -> tuple[Any, Callable[[], None]]:
    """None for in-process maps, or an executor whose maps run on Dask workers, and how to close it.

    With `execution.executor: dask` the cluster comes from prefect-dask's `DaskTaskRunner`: the
    flow's own runner when it was started with one (`data_to_model.with_options(task_runner=...)`),
    else one built here, connected to `execution.dask_address` or, without an address, starting a
    local cluster of two worker processes. The stages get a `distributed` client's executor, so their
    per-batch maps (parsing, signatures, filter signals, encoding) run on the workers; everything else
    (reading manifests, writing outputs) stays in this process.
    """
    if cfg.execution.executor == "local":
        return local_executor(cfg.execution.workers)
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


DEPLOYMENT_LOCK_WAIT_S = 6 * 3600.0
"""How long a run started by a deployment (a schedule, a worker) waits for the run root's lock by default.

A scheduled run that finds the previous run still working should queue behind it rather than fail; after
six hours something is wrong, and a failure naming the holder says more than a run waiting forever.
"""


def _started_by_deployment() -> bool:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx is not None and ctx.flow_run is not None and ctx.flow_run.deployment_id)


def lock_wait_s(cfg: Any) -> float:
    """`execution.lock_wait_s`, or when unset: 0 (fail at once) by hand, `DEPLOYMENT_LOCK_WAIT_S` from a deployment."""
    if cfg.execution.lock_wait_s is not None:
        return float(cfg.execution.lock_wait_s)
    return DEPLOYMENT_LOCK_WAIT_S if _started_by_deployment() else 0.0


def _waiting_for(layout: RunLayout, cfg: Any) -> Callable[[dict[str, Any]], None]:
    """What a run that waits for the lock says once, so a run that seems stuck explains itself."""

    def say(holder: dict[str, Any]) -> None:
        try:
            logger: Any = get_run_logger()
        except Exception:  # noqa: BLE001 - called outside a flow run (the flow's function itself)
            import logging

            logger = logging.getLogger(__name__)
        logger.warning("run root %s is in use by %s; waiting up to %.0f s for it", layout.root,
                       describe_holder(holder), lock_wait_s(cfg))

    return say


@flow(name="data_to_model", log_prints=True)
def data_to_model(
    sources: list[str],
    root: str = ".refinery",
    config: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Raw documents to a trained, evaluated and registered model. Returns a summary.

    Each selected stage of the graph is one Prefect task that receives the typed
    outputs of the stages it reads, so the flow run's task graph is the data graph.
    The run root's lock (storage/lock.py) is held for the whole run, so two runs
    never write one root at once; a run that cannot get it within
    `execution.lock_wait_s` fails naming the run that holds it.
    """
    graph = active()
    cfg = validate_config(config or {}, graph)
    layout = RunLayout.at(root)
    from prefect.runtime import flow_run

    lock = RootLock(layout.root)
    try:
        lock.acquire(lock_wait_s(cfg), flow_run=flow_run.get_name(), on_wait=_waiting_for(layout, cfg))
    except RootLocked as exc:  # outputs untouched; a returned Failed state fails the run without a traceback
        return Failed(message=str(exc), data=exc)  # type: ignore[return-value]
    try:
        return _run_pipeline(graph, cfg, layout, sources, stages, from_stage, force)
    finally:
        lock.release()


def _run_pipeline(
    graph: Graph, cfg: Any, layout: RunLayout, sources: list[str], stages: list[str] | None,
    from_stage: str | None, force: bool,
) -> dict[str, Any]:
    """The body of `data_to_model`, run while the run root's lock is held."""
    layout.create(graph.names)
    selected, forced = graph.select(stages, from_stage)
    if force:
        forced = set(selected)
    lineage = Lineage(layout.tracking_uri(cfg.tracking.mlflow_uri), cfg.tracking.experiment, layout.mlflow_artifacts)
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
    env = RunEnv(graph, layout, cfg, lineage, sources, forced, executor)
    summary: dict[str, Any] = {"root": str(layout.root), "mlflow_run_id": parent, "stages": {}}
    status = "FAILED"
    try:
        outputs: dict[str, StageOutput] = {}
        for name in selected:
            stage = graph[name]
            inputs = {i: outputs[i] if i in outputs else completed_output(layout, graph[i], name) for i in stage.inputs}
            out = stage_task(stage)(quote(env), name, inputs)
            outputs[name] = out.result() if isinstance(out, State) else out  # a skipped stage returns its state
            manifest = env.outcomes[name]["manifest"]
            summary["stages"][name] = {
                **{k: v for k, v in env.outcomes[name].items() if k != "manifest"},
                "in": manifest.counts.in_,
                "kept": manifest.counts.kept,
                "dropped": manifest.counts.dropped,
                "metrics": manifest.metrics,
                # what a stage resolved at run time (the precision it measured, the tokens the model saw)
                **{k: manifest.extra[k] for k in ("precision", "tokens_seen_by_format") if k in manifest.extra},
            }
            readers = [r for r in selected if name in graph[r].inputs]
            if isinstance(outputs[name], Documents) and outputs[name].documents == 0 and readers:
                # Stop here with the reason rather than let the next stage fail on an empty input. A returned
                # Failed state fails the flow run without a traceback; calling the flow raises its exception.
                message = empty_output_message(name, manifest, readers)
                lineage.client.set_tag(parent, "refinery.error", message)
                return Failed(message=message, data=EmptyStageOutput(message))  # type: ignore[return-value]
        evaluation = next((o for o in outputs.values() if isinstance(o, Evaluation)), None)
        model = next((o for o in outputs.values() if isinstance(o, Checkpoint)), None)
        if evaluation is not None and (warning := _quality_warning(cfg, evaluation)):
            get_run_logger().warning(warning)
            lineage.client.set_tag(parent, "refinery.warning", warning)
            summary["warning"] = warning
            if not cfg.tracking.register_poor_models:
                summary["not_registered"] = (
                    "no model registered (set tracking.register_poor_models=true to register it anyway); "
                    f"the checkpoint is in {model.dir if model else layout.root}"
                )
                model = None
        if model is not None:
            val = (evaluation or model).metrics.get("val_loss")
            tok_stage = graph.producing(TokenizerFile)
            tokenizer = outputs.get(tok_stage.name) or completed_output(layout, tok_stage, model.stage)
            summary["model"] = _register_model(env, model, tokenizer, val)  # type: ignore[arg-type]
            from refinery.flows.lineage_graph import record_provenance

            mv = lineage.client.get_model_version(summary["model"]["name"], summary["model"]["version"])
            summary["provenance"] = str(record_provenance(layout, sources, lineage.client, mv.run_id))
        if evaluation is not None:
            lineage.log_metrics(parent, evaluation.metrics, step=0)
        status = "FINISHED"
        return summary
    finally:
        close_executor()
        lineage.end_pipeline(status)
