"""The `refinery` command line.

Heavy imports (Prefect, MLflow, torch) happen inside the commands, after the
environment is configured for the chosen run root, so `refinery --help` is
instant and Prefect's database lands inside the run root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from refinery.flows.env import configure_environment

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


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
) -> None:
    """Run the pipeline: ingest, dedup, filter, tokenizer, shards, train, eval.

    A stage whose inputs and config are unchanged since its last run is skipped,
    so running twice does nothing the second time, and changing one filter
    threshold re-runs from the filter stage on.
    """
    configure_environment(root)
    from refinery.flows.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    if sample not in ("tiny", "default"):
        _fail(f"--sample must be tiny or default, not {sample!r}")
    sources = list(source or [])
    if not sources:
        from refinery.storage.sample_corpus import build_sample_corpus

        info = build_sample_corpus(Path(root).resolve() / "sample-corpus", size=sample)  # type: ignore[arg-type]
        typer.echo(f"Using the bundled sample corpus ({sample}): {info.files} files, {info.bytes / 1e6:.1f} MB at {info.root}")
        sources = [str(info.root)]
    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None

    from refinery.flows.pipeline import data_to_model, select_stages

    try:
        select_stages(stage_list, from_stage)
    except ValueError as exc:
        _fail(str(exc))
    summary = data_to_model(
        sources=sources,
        root=str(Path(root).resolve()),
        config=cfg.model_dump(mode="json"),
        stages=stage_list,
        from_stage=from_stage,
        force=force,
    )
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """The closing table: what each stage did, the model's quality, and where things are."""
    typer.echo("")
    typer.secho(f"{'stage':<10} {'status':<8} {'in':>8} {'kept':>8} {'dropped':>8} {'seconds':>8}", bold=True)
    for stage, s in summary["stages"].items():
        dropped = sum(s["dropped"].values())
        typer.echo(f"{stage:<10} {s['status']:<8} {s['in']:>8,} {s['kept']:>8,} {dropped:>8,} {s.get('seconds', 0):>8.1f}")
    ev = summary["stages"].get("eval", {}).get("metrics") or {}
    if ev:
        typer.echo("")
        typer.echo(f"validation loss  {ev['val_loss']:.4f} nats/token  ({ev['val_bpb']:.4f} bits/byte)")
        typer.echo(f"unigram baseline {ev['unigram_loss']:.4f} nats/token  ({ev['unigram_bpb']:.4f} bits/byte)")
    root = Path(summary["root"])
    typer.echo("")
    typer.echo(f"Results in {root}/  (one folder per stage, each with its manifest.json)")
    if "model" in summary:
        m = summary["model"]
        typer.echo(f"Model registered in MLflow as {m['uri']}")
    typer.echo(f"Browse the run: refinery ui --root {root}")


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
    from refinery.storage.sample_corpus import build_sample_corpus

    info = build_sample_corpus(dest, size=size)  # type: ignore[arg-type]
    typer.echo(json.dumps(info.model_dump(mode="json"), indent=2))


@app.command()
def inspect(
    sql: Annotated[str | None, typer.Argument(help="SQL over the views; without it, an overview of the run.")] = None,
    root: RootOpt = DEFAULT_ROOT,
    limit: Annotated[int, typer.Option(help="Rows to print at most.")] = 20,
) -> None:
    """Ask questions of a run's outputs in SQL (DuckDB).

    Views: ingest, dedup, filter (kept documents of each stage), dropped (every
    dropped document with stage and reason), quarantine, manifests. Example:

      refinery inspect "select reason, count(*) from dropped group by 1 order by 2 desc"
    """
    from refinery.storage.catalog import Catalog

    catalog = Catalog(Path(root))
    if not catalog.views:
        _fail(f"no stage outputs under {Path(root).resolve()}; run `refinery run --root {root}` first")
    query = sql or catalog.overview_sql()
    try:
        typer.echo(catalog.format(query, limit=limit))
    except Exception as exc:  # noqa: BLE001 - DuckDB's own message is the useful one
        _fail(f"{exc}\nviews: {', '.join(catalog.views)}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    root: RootOpt = DEFAULT_ROOT,
    model: Annotated[
        str | None,
        typer.Option(help="Checkpoint folder, or models:/NAME/VERSION, or runs:/RUN_ID/model. Default: the run root's trained model."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1)] = 50,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = 0.95,
    seed: int = 0,
) -> None:
    """Generate text with a trained model, streaming tokens to the terminal (KV-cached decoding)."""
    configure_environment(root)
    from tokenizers import Tokenizer

    from refinery.model.checkpoint import load_model
    from refinery.model.generate import generate as gen

    checkpoint, tokenizer_file = _resolve_model(model, Path(root))
    net = load_model(checkpoint, device="cpu")
    tok = Tokenizer.from_file(str(tokenizer_file))
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
        top_k=top_k, top_p=top_p, eos_id=eot, seed=seed, on_token=on_token)
    typer.echo("")


def _resolve_model(model: str | None, root: Path) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer.json) for a local folder, a run root, or an MLflow model URI."""
    if model and (model.startswith("models:/") or model.startswith("runs:/")):
        import mlflow

        from refinery.storage.layout import RunLayout

        mlflow.set_tracking_uri(RunLayout.at(root).mlflow_tracking_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        checkpoints = [p.parent for p in local.rglob("model.safetensors")]
        tokenizers = list(local.rglob("tokenizer.json"))
        if not checkpoints or not tokenizers:
            _fail(f"{model} holds no Refinery checkpoint and tokenizer")
        return checkpoints[0], tokenizers[0]
    if model:
        path = Path(model)
        tok = path / "tokenizer.json"
        if not tok.is_file():
            tok = root / "tokenizer" / "tokenizer.json"
        return path, tok
    from refinery.storage.manifest import read_manifest

    train = read_manifest(root / "train")
    if train is None:
        _fail(f"no trained model under {root.resolve()}; run `refinery run --root {root}` first or pass --model")
    return root / "train" / train.extra["checkpoint_dir"], root / "tokenizer" / "tokenizer.json"


@app.command()
def ui(root: RootOpt = DEFAULT_ROOT) -> None:
    """How to open the Prefect UI and the MLflow UI on a run root's stores."""
    from refinery.storage.layout import RunLayout

    layout = RunLayout.at(root)
    typer.echo("Prefect UI (flow runs, task runs, stage reports):")
    typer.echo(f"  PREFECT_HOME={layout.prefect_home} PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start --host 127.0.0.1 --port 4200")
    typer.echo("  then open http://127.0.0.1:4200/runs")
    typer.echo("MLflow UI (experiment 'refinery': a parent run per pipeline run, a nested run per stage; Models tab: refinery-lm):")
    typer.echo(f"  MLFLOW_DISABLE_TELEMETRY=true mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri {layout.mlflow_tracking_uri} --default-artifact-root {layout.mlflow_artifacts.as_uri()}")
    typer.echo("  then open http://127.0.0.1:5000")


if __name__ == "__main__":
    app()
