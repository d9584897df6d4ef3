"""The `refinery` command line.

Heavy imports (Prefect, MLflow, torch) happen inside the commands, after the
environment is configured for the chosen run root, so `refinery --help` is
instant and Prefect's database lands inside the run root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from refinery.flows.env import configure_environment
from refinery.reaper import start_reaper

app = typer.Typer(
    name="refinery",
    help=(
        "Refinery: raw documents in; a cleaned, deduplicated, filtered, tokenized corpus and a language "
        "model trained from scratch out, with every step traced in Prefect and MLflow.\n\n"
        "Start with `refinery run` (the bundled sample corpus), then `refinery ui` to browse the run."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

RootOpt = Annotated[Path, typer.Option("--root", "-r", help="Run root: one folder per stage plus the MLflow and Prefect stores.")]
DEFAULT_ROOT = Path(".refinery")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def run(
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="Folder, file or URI (s3://, file://) to ingest; repeatable. Default: the bundled sample corpus."),
    ] = None,
    root: RootOpt = DEFAULT_ROOT,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file overriding the defaults (see `refinery config`).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one config value, e.g. --set train.max_steps=200; repeatable; wins over --config."),
    ] = None,
    stages: Annotated[str | None, typer.Option("--stages", help="Comma-separated stages to run, e.g. filter,tokenizer.")] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Re-run this stage and every later one, even if unchanged.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run the selected stages even if unchanged.")] = False,
    sample: Annotated[str, typer.Option(help="Size of the bundled sample corpus when no --source is given: tiny or default.")] = "default",
    stale: Annotated[bool, typer.Option("--stale", help="Re-run only what `refinery lineage` marks stale.")] = False,
) -> None:
    """Run the pipeline: ingest, dedup, filter, tokenizer, shards, train, eval.

    A stage whose inputs and config are unchanged since its last run is skipped,
    so running twice does nothing the second time, and changing one filter
    threshold re-runs from the filter stage on.
    """
    from refinery.flows.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    if sample not in ("tiny", "default"):
        _fail(f"--sample must be tiny or default, not {sample!r}")
    sources = list(source or [])
    if problem := _check_sources(sources, cfg.ingest):
        _fail(problem)  # before Prefect starts or the run root is created
    if problem := _check_saved_configs(root):
        _fail(problem)
    from refinery.storage.lock import EXIT_LOCKED, RootLock, RootLocked

    if not cfg.execution.lock_wait_s:  # not waiting: refuse before Prefect starts (the flow checks again, holding it)
        try:
            RootLock(Path(root).resolve()).check_free()
        except RootLocked as exc:
            _fail(str(exc), EXIT_LOCKED)
    configure_environment(root)
    start_reaper()  # Prefect's temporary server must not outlive a killed run
    if not sources:
        from refinery.sample_corpus import build_sample_corpus

        info = build_sample_corpus(Path(root).resolve() / "sample-corpus", size=sample)  # type: ignore[arg-type]
        typer.echo(f"Using the bundled sample corpus ({sample}): {info.files} files, {info.bytes / 1e6:.1f} MB at {info.root}")
        sources = [str(info.root)]
    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    if stale:
        from refinery.flows.lineage_graph import build_graph

        from_stage = build_graph(Path(root).resolve(), sources, cfg, use_mlflow=False).first_stale()
        if from_stage is None:
            typer.echo("Nothing is stale: every stage matches its inputs and config.")
            return
        typer.echo(f"Stale from stage {from_stage!r} on; re-running from there.")

    from refinery.flows.pipeline import EmptyStageOutput, data_to_model, select_stages

    try:
        select_stages(stage_list, from_stage)
    except ValueError as exc:
        _fail(str(exc))
    try:
        summary = data_to_model(
            sources=sources,
            root=str(Path(root).resolve()),
            config=cfg.model_dump(mode="json"),
            stages=stage_list,
            from_stage=from_stage,
            force=force,
        )
    except EmptyStageOutput as exc:  # the run stopped with a reason; a traceback would only hide it
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except RootLocked as exc:  # another run holds the root (after execution.lock_wait_s)
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_LOCKED) from None
    print_summary(summary)


def _check_saved_configs(root: Path) -> str | None:
    """Why the run root's saved configs (stage manifests, checkpoint config.json) can't be read back, or None.

    A run compares each stage's manifest with its inputs and config to skip unchanged
    stages, and training resumes from its checkpoint's config.json, so a file edited by
    hand or damaged must be named before the flow starts, not fail inside it as a traceback.
    """
    from refinery.flows.graph import active
    from refinery.storage.layout import RunLayout
    from refinery.storage.manifest import ManifestError, read_manifest

    layout = RunLayout.at(root)
    if not layout.root.is_dir():
        return None
    for stage in active().names:
        try:
            read_manifest(layout.stage_dir(stage))
        except ManifestError as exc:
            return str(exc)
    saved = sorted(layout.root.glob("*/checkpoint*/config.json"))
    if saved:
        from refinery.model.checkpoint import CheckpointConfigError, read_config

        for path in saved:
            try:
                read_config(path.parent)
            except CheckpointConfigError as exc:
                return str(exc)
    return None


def _check_sources(sources: list[str], ingest_cfg: Any) -> str | None:
    """Why the local sources cannot be ingested (missing, unreadable, nothing to read), or None.

    Checked before anything starts, so a typo in --source is one line at once rather than a run root,
    a Prefect server and retries of an I/O error. Remote URIs are left to ingest: listing them needs the
    network and credentials.
    """
    import os

    from refinery.tasks.ingest.sources import list_sources

    for src in sources:
        scheme, sep, rest = src.partition("://")
        if sep and scheme != "file":
            continue
        path = Path(rest if sep else src).expanduser()
        if not path.exists():
            return f"source {src!r} does not exist; check the --source path"
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            return f"source {src!r} cannot be read; check its permissions"
        if not path.is_dir():
            continue
        try:
            files = list_sources([str(path)], ingest_cfg)
        except OSError as exc:
            return f"source {src!r} cannot be listed: {exc}"
        if not any(f.error is None for f in files):
            problems = "; ".join(sorted({f"{f.rel}: {f.error[1]}" for f in files if f.error})[:3])
            globs = ", ".join(ingest_cfg.include[:6]) + (", ..." if len(ingest_cfg.include) > 6 else "")
            return (
                f"source folder {src!r} has no file to ingest (files are read when they match ingest.include: "
                f"{globs}; and not ingest.exclude)" + (f"; unreadable: {problems}" if problems else "")
            )
    return None


def print_summary(summary: dict) -> None:
    """The closing table: what each stage did, the model's quality, and where things are."""
    typer.echo("")
    typer.secho(f"{'stage':<10} {'status':<8} {'in':>8} {'kept':>8} {'dropped':>8} {'seconds':>8}", bold=True)
    for stage, s in summary["stages"].items():
        dropped = sum(s["dropped"].values())
        typer.echo(f"{stage:<10} {s['status']:<8} {s['in']:>8,} {s['kept']:>8,} {dropped:>8,} {s.get('seconds', 0):>8.1f}")
    reasons = drop_reason_lines(summary["stages"])
    if reasons:
        typer.echo("")
        typer.secho("dropped by reason (ingest: quarantined; `refinery inspect` has the documents)", bold=True)
        for line in reasons:
            typer.echo(line)
    ev = summary["stages"].get("eval", {}).get("metrics") or {}
    if ev:
        typer.echo("")
        typer.echo(f"validation loss  {ev['val_loss']:.4f} nats/token  ({ev['val_bpb']:.4f} bits/byte)")
        typer.echo(f"unigram baseline {ev['unigram_loss']:.4f} nats/token  ({ev['unigram_bpb']:.4f} bits/byte)")
    if summary.get("warning"):
        typer.echo("")
        typer.secho(f"warning: {summary['warning']}", fg=typer.colors.YELLOW, err=True)
        if summary.get("not_registered"):
            typer.secho(summary["not_registered"], fg=typer.colors.YELLOW, err=True)
    root = Path(summary["root"])
    typer.echo("")
    typer.echo(f"Results in {root}/  (one folder per stage, each with its manifest.json)")
    if "model" in summary:
        m = summary["model"]
        typer.echo(f"Model registered in MLflow as {m['uri']}")
    typer.echo(f"Browse the run: refinery ui --root {root}")


def drop_reason_lines(stages: dict[str, dict], most: int = 6) -> list[str]:
    """One indented line per stage that dropped anything: its reasons by count, the largest first."""
    lines = []
    for stage, s in stages.items():
        dropped = sorted((s.get("dropped") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        if not dropped:
            continue
        shown = ", ".join(f"{reason} {n:,}" for reason, n in dropped[:most])
        more = f", +{len(dropped) - most} more" if len(dropped) > most else ""
        lines.append(f"  {stage:<10} {shown}{more}")
    return lines


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file to merge over the defaults.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one value; repeatable.")] = None,
) -> None:
    """Print the effective configuration as YAML (defaults, then --config, then --set)."""
    import yaml

    from refinery.flows.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def sample_corpus(
    dest: Annotated[Path, typer.Argument(help="Folder to write the corpus into.")],
    size: Annotated[str, typer.Option(help="tiny or default")] = "default",
) -> None:
    """Build the bundled sample corpus (made from Python's own sources and docs) into a folder."""
    from refinery.sample_corpus import build_sample_corpus

    info = build_sample_corpus(dest, size=size)  # type: ignore[arg-type]
    typer.echo(json.dumps(info.model_dump(mode="json"), indent=2))


@app.command()
def stages(
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Print the graph as a Mermaid flowchart (docs/architecture.md).")] = False,
) -> None:
    """The pipeline's stages as declared (flows/stages.py): what each reads and hands on."""
    from refinery.flows.graph import active

    graph = active()
    if mermaid:
        typer.echo(graph.mermaid(), nl=False)
        return
    typer.secho(f"{'stage':<10} {'reads':<26} {'output':<14} what it does", bold=True)
    for s in graph.stages:
        reads = ", ".join(s.inputs) or "sources"
        typer.echo(f"{s.name:<10} {reads:<26} {s.output.__name__:<14} {s.summary}")


@app.command()
def inspect(
    sql: Annotated[str | None, typer.Argument(help="SQL over the views; without it, an overview of the run.")] = None,
    root: RootOpt = DEFAULT_ROOT,
    limit: Annotated[int, typer.Option(help="Rows to print at most.")] = 20,
) -> None:
    """Ask questions of a run's outputs in SQL (DuckDB).

    Views: ingest, dedup, filter (kept documents of each stage), dropped (every
    dropped document with stage and reason), quarantine, signals (the filter's
    quality signals), shard_stats, provenance (training tokens per source file),
    manifests. Read-only: statements that write or change settings, and files
    outside the run root, are refused (exit code 2). Example:

      refinery inspect "select reason, count(*) from dropped group by 1 order by 2 desc"
    """
    from refinery.flows.graph import active
    from refinery.storage.catalog import ReadOnlyQueryError
    from refinery.storage.manifest import ManifestError

    try:
        catalog = active().catalog(Path(root))
    except ManifestError as exc:  # a hand-edited or damaged manifest.json: name it, no traceback
        _fail(str(exc))
    if not catalog.views:
        _fail(f"no stage outputs under {Path(root).resolve()}; run `refinery run --root {root}` first")
    query = sql or catalog.overview_sql()
    try:
        typer.echo(catalog.format(query, limit=limit))
    except ReadOnlyQueryError as exc:  # writes, settings, files outside the root: refused, rc 2
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - DuckDB's own message is the useful one
        _fail(f"{exc}\nviews: {', '.join(catalog.views)}")


DeviceOpt = Annotated[
    str, typer.Option(help="auto (a CUDA GPU when one is visible, else the CPU), cpu or cuda.")
]


def _device(name: str) -> str:
    """The torch device for `--device`, or a one-line error (an unknown name, cuda without a GPU)."""
    if name not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, not {name!r}")
    from refinery.model.train import resolve_device

    try:
        return str(resolve_device(name))
    except RuntimeError as exc:
        _fail(f"--device {name}: {exc}")
    raise AssertionError  # unreachable: _fail exits


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    root: RootOpt = DEFAULT_ROOT,
    model: Annotated[
        str | None,
        typer.Option(help="Checkpoint folder, or models:/NAME/VERSION, or runs:/RUN_ID/model. Default: the run root's trained model."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 decodes greedily.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1)] = 50,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = 0.95,
    int8: Annotated[bool, typer.Option("--int8", help="Quantize linear layers to int8 weights (a quarter of the memory).")] = False,
    compile: Annotated[
        bool,
        typer.Option("--compile", help="Decode with a torch.compile'd static-shape step: seconds to compile, then faster per token (worth it from a few hundred tokens)."),
    ] = False,
    seed: int = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Generate text with a trained model, streaming tokens to the terminal (KV-cached decoding)."""
    configure_environment(root)
    from refinery.model.checkpoint import CheckpointConfigError
    from refinery.model.generate import compile_unavailable
    from refinery.model.generate import generate as gen
    from refinery.serving.loading import load_for_serving
    from refinery.storage.manifest import ManifestError

    try:
        net, tok = load_for_serving(model, root=root, int8=int8, device=_device(device))
    except (FileNotFoundError, ManifestError, CheckpointConfigError) as exc:  # damaged saved configs name the file
        _fail(str(exc))
    if compile and (reason := compile_unavailable(next(net.parameters()).device)):
        _fail(f"--compile: {reason}")
    eot = tok.token_to_id("<|endoftext|>")
    typer.echo(prompt, nl=False)
    produced: list[int] = []
    printed = 0

    def on_token(_row: int, token: int) -> None:
        nonlocal printed
        produced.append(token)
        text = tok.decode(produced, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    gen(net, [tok.encode(prompt).ids or [eot]], max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eot, seed=seed, on_token=on_token, compile=compile)
    typer.echo("")


ModelOpt = Annotated[
    str | None,
    typer.Option(help="Checkpoint folder, or models:/NAME/VERSION, or runs:/RUN_ID/model. Default: the run root's trained model."),
]
HostOpt = Annotated[str, typer.Option(help="Address to bind; loopback by default.")]
Int8Opt = Annotated[bool, typer.Option("--int8", help="Serve with int8 weights.")]
AdapterOpt = Annotated[Path | None, typer.Option(help="LoRA adapter folder to apply (merged into the weights).")]
ApiKeyFileOpt = Annotated[Path | None, typer.Option(
    help="File holding the bearer token clients must send (default: $REFINERY_API_KEY; neither: no auth).")]  # fmt: skip


def _warn(message: str) -> None:
    typer.secho(message, fg=typer.colors.YELLOW, err=True)


def _serve_http(root: Path, model: str | None, host: str, port: int, int8: bool, adapter: Path | None,
                api_key_file: Path | None = None, device: str = "auto") -> None:  # fmt: skip
    """Load the model (a missing one is a one-line error, not a traceback), then serve until Ctrl-C."""
    configure_environment(root)
    from refinery.serving.server import run as run_server

    try:
        run_server(model, host=host, port=port, int8=int8, root=root, adapter=adapter, api_key_file=api_key_file,
                   device=_device(device))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def serve(
    root: RootOpt = DEFAULT_ROOT,
    model: ModelOpt = None,
    host: HostOpt = "127.0.0.1",
    port: int = 8000,
    int8: Int8Opt = False,
    adapter: AdapterOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    device: DeviceOpt = "auto",
    # `refinery serve` used to be the schedule. Its options stay accepted, hidden, so that old
    # command lines keep working (with a warning) instead of silently starting an HTTP server.
    source: Annotated[list[str] | None, typer.Option("--source", "-s", hidden=True)] = None,
    cron: Annotated[str | None, typer.Option(hidden=True)] = None,
    interval: Annotated[float | None, typer.Option(hidden=True)] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", hidden=True)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", hidden=True)] = None,
    name: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Serve a model over HTTP: POST /v1/completions (OpenAI completions shape; stream=true for server-sent events), GET /health.

    To run the pipeline on a schedule, see `refinery schedule`.
    """
    if source or set_ or any(v is not None for v in (cron, interval, config, name)):
        _warn("`refinery serve --source/--cron` (the schedule) is now `refinery schedule`; "
              "`refinery serve` serves a model over HTTP. Running the schedule.")  # fmt: skip
        _run_schedule(source, root, cron or DEFAULT_CRON, interval, config, set_, name or DEFAULT_DEPLOYMENT)
        return
    _serve_http(root, model, host, port, int8, adapter, api_key_file, device)


@app.command("serve-model", hidden=True)
def serve_model(
    root: RootOpt = DEFAULT_ROOT,
    model: ModelOpt = None,
    host: HostOpt = "127.0.0.1",
    port: int = 8000,
    int8: Int8Opt = False,
    adapter: AdapterOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Deprecated name of `refinery serve`."""
    _warn("`refinery serve-model` is deprecated; use `refinery serve`")
    _serve_http(root, model, host, port, int8, adapter, api_key_file, device)


@app.command()
def finetune(
    base: Annotated[str, typer.Option(help="Base model: models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint folder.")],
    source: Annotated[list[str], typer.Option("--source", "-s", help="Domain folder, file or URI; repeatable.")],
    root: RootOpt = DEFAULT_ROOT,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML: lora:, train:, data:, name:, registered_model:.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one value, e.g. --set lora.rank=16; repeatable.")] = None,
) -> None:
    """Adapt a trained model to a domain folder with LoRA; registers the result as a new model version.

    The domain documents go through the same ingest, dedup, filter and shards
    stages, with the base model's tokenizer, under <root>/finetune/<name>/.
    """
    configure_environment(root)
    import yaml

    from refinery.flows.finetune import FinetuneConfig
    from refinery.flows.finetune import finetune as finetune_flow
    from refinery.overrides import apply_overrides

    tree: dict = (yaml.safe_load(config.read_text()) or {}) if config else {}
    try:
        cfg = FinetuneConfig.model_validate(apply_overrides(tree, set_ or []))
    except ValueError as exc:  # ConfigError and pydantic's ValidationError both are
        _fail(str(exc))
    summary = finetune_flow(base=base, sources=source, root=str(Path(root).resolve()), config=cfg.model_dump(mode="json"))
    typer.echo(f"validation loss on the domain set: {summary['val_loss_before']:.4f} -> {summary['val_loss']:.4f}")
    typer.echo(f"adapters in {summary['adapter_dir']}; merged model registered as {summary['model']['uri']}")


@app.command()
def lineage(
    root: RootOpt = DEFAULT_ROOT,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="Sources as given to `refinery run`; default: the last run's (from MLflow)."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help=(
        "Judge against this YAML config, as `refinery run --config` would use it; default: the config each "
        "stage ran with (recorded in its manifest, and written to <out>/config.yaml)."))] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=(
        "Judge against the defaults (or --config) with this value changed, as `refinery run --set` would; "
        "repeatable. E.g. --config <root>/lineage/config.yaml --set filter.gopher_quality.min_words=80: what that change re-runs."))] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for lineage.png, lineage.mmd and config.yaml; default <root>/lineage.")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log the graph to MLflow.")] = False,
) -> None:
    """The graph from raw sources through every stage to each registered model.

    A stage whose inputs changed since it ran is marked stale, with everything
    downstream, and the command that re-runs exactly that part is printed (or
    use `refinery run --stale`). With no --config/--set each stage is judged
    against the config it ran with, so an untouched run is up to date; with
    them, against that config: what `refinery run` with them would re-run.
    """
    configure_environment(root)
    from refinery.flows.lineage_graph import main as lineage_main

    try:
        lineage_main(root, sources=source, config_file=config, overrides=set_ or [], out_dir=out, log=not no_log,
                     echo=typer.echo)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        _fail(str(exc))


@app.command()
def ui(
    root: RootOpt = DEFAULT_ROOT,
    print_only: Annotated[bool, typer.Option("--print", help="Only print the commands, start nothing.")] = False,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
) -> None:
    """Open the Prefect UI and the MLflow UI on a run root's stores (loopback only; Ctrl-C or SIGTERM stops both).

    When MLflow tracking goes to a server ($MLFLOW_TRACKING_URI=http://...), that
    server's own UI is where the runs are, so only the Prefect UI is started.
    """
    from refinery.flows import ui as ui_mod
    from refinery.storage.layout import RunLayout

    layout = RunLayout.at(root)
    cmds = ui_mod.commands(layout, prefect_port, mlflow_port)
    tracking_server = ui_mod.tracking_server(layout)
    typer.echo(f"Prefect UI  http://127.0.0.1:{prefect_port}/runs   flow runs, one task run per stage, stage reports")
    if tracking_server:
        typer.echo(f"MLflow UI   {tracking_server}   the tracking server ($MLFLOW_TRACKING_URI); no local MLflow UI started")
    else:
        typer.echo(f"MLflow UI   http://127.0.0.1:{mlflow_port}   experiment 'refinery' (parent run, nested stage runs); Models tab")
    if print_only:
        typer.echo(f"\nPREFECT_HOME={layout.prefect_home} PREFECT_SERVER_ANALYTICS_ENABLED=false {' '.join(cmds['prefect'])}")
        if "mlflow" in cmds:
            typer.echo(f"MLFLOW_DISABLE_TELEMETRY=true {' '.join(cmds['mlflow'])}")
        return
    start_reaper()  # SIGKILL leaves no servers behind either
    with ui_mod.sigterm_as_interrupt():  # SIGTERM (a service manager, `kill`) stops the servers like Ctrl-C
        procs = ui_mod.start(layout, prefect_port, mlflow_port)
        typer.echo(f"{'Both servers are' if len(procs) > 1 else 'The Prefect server is'} starting (a few seconds); "
                   "Ctrl-C or SIGTERM stops them.")
        try:
            while all(p.poll() is None for p in procs):
                import time

                time.sleep(1)
            _fail("a server exited early; run `refinery ui --print` and start the commands by hand to see why")
        except KeyboardInterrupt:
            pass
        finally:
            ui_mod.stop(procs)


DEFAULT_CRON = "0 * * * *"
DEFAULT_DEPLOYMENT = "scheduled"


@app.command()
def schedule(
    source: Annotated[list[str] | None, typer.Option("--source", "-s", help="What each scheduled run ingests; repeatable.")] = None,
    root: RootOpt = DEFAULT_ROOT,
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 * * * *' for hourly.")] = DEFAULT_CRON,
    interval: Annotated[float | None, typer.Option(help="Or: seconds between runs (instead of --cron).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config for the runs.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one config value; repeatable.")] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = DEFAULT_DEPLOYMENT,
    stages: Annotated[str | None, typer.Option("--stages", help="Comma-separated stages each run runs, e.g. ingest,dedup; default all.")] = None,
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect server started when no Prefect API answers.")] = 4200,
) -> None:
    """Run the pipeline on a schedule, as a Prefect deployment (runs until Ctrl-C or SIGTERM).

    Each run skips unchanged stages, so an hourly run over a growing folder only
    processes what is new. Runs go to PREFECT_API_URL, or to a Prefect server on
    127.0.0.1:4200 if one answers (e.g. `refinery ui`); otherwise a Prefect server
    is started for the run root (its UI shows the runs) and stopped with the schedule.
    """
    _run_schedule(source, root, cron, interval, config, set_, name, stages=stages, prefect_port=prefect_port)


def _run_schedule(
    source: list[str] | None,
    root: Path,
    cron: str,
    interval: float | None,
    config: Path | None,
    set_: list[str] | None,
    name: str,
    stages: str | None = None,
    prefect_port: int = 4200,
) -> None:
    """The body of `refinery schedule`, shared with the old `refinery serve --source` form."""
    configure_environment(root)
    start_reaper()  # the Prefect server started for the schedule must not outlive a killed command
    from refinery.flows import schedule as schedule_mod
    from refinery.flows.config import ConfigError, load_config
    from refinery.flows.ui import sigterm_as_interrupt
    from refinery.storage.layout import RunLayout

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    if not source:
        _fail("--source is required: the folder or URI each scheduled run ingests")
    if not interval:
        try:
            schedule_mod.check_cron(cron)
        except ValueError as exc:
            _fail(str(exc))
    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    if stage_list:
        from refinery.flows.pipeline import select_stages

        try:
            select_stages(stage_list, None)
        except ValueError as exc:
            _fail(str(exc))
    params = {"sources": [str(Path(s).resolve()) if "://" not in s else s for s in source],
              "root": str(Path(root).resolve()), "config": cfg.model_dump(mode="json")}
    if stage_list:
        params["stages"] = stage_list
    layout = RunLayout.at(root)
    with sigterm_as_interrupt():
        api = schedule_mod.choose_api()
        if api:
            typer.echo(f"Prefect API: {api}")
            schedule_mod.serve_deployment(name, None if interval else cron, interval, params)
            return
        # Prefect's temporary in-process server cannot keep schedules: start a persistent one for the root.
        typer.echo(f"No Prefect API answers; starting a Prefect server for {layout.root} (its home {layout.prefect_home})")
        try:
            with schedule_mod.local_server(layout.prefect_home, prefect_port) as api:
                schedule_mod.use_api(api)
                ui_url = api.removesuffix("/api")
                typer.echo(f"Prefect API: {api}")
                typer.echo(f"Prefect UI  {ui_url}/runs   the scheduled runs; the server stops with the schedule")
                schedule_mod.serve_deployment(name, None if interval else cron, interval, params)
        except RuntimeError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            pass
        typer.echo("Schedule stopped; the Prefect server is stopped.")

if __name__ == "__main__":
    app()
