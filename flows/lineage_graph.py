"""`refinery lineage`: the graph from raw sources through every stage to each registered model.

The graph is read, not recorded twice: stage nodes come from the manifests in
the run root, model nodes from the MLflow model registry (each version is
tagged with the `refinery.input_digest` / `refinery.output_digest` of the
training stage that made it), and the MLflow stage run that produced each
manifest is found by its `refinery.output_digest` tag.

Staleness asks, stage by stage, whether running the pipeline now would redo
the stage, with the same check the flow uses to skip (`flows.graph.staleness`):
the input digest (the sources' digest for a stage that reads them, else the
output digests of the stages it reads), the config hash of its section, its
code version, and its outputs intact. A stage that reads a stale one is stale
too (its input is about to change), and so is a model version trained on a
training output that is stale or gone. The first stale stage is where
`refinery run --from STAGE` re-runs exactly the stale part. The edges are the
stage graph's (flows/stages.py), plus one from each model version a continued
training run started from (`train.init_from`) to the version it made.

By default each stage is judged against the config it ran with (its manifest
records its section) and the sources of the root's last run that read them
(its MLflow parent run records them), so an untouched run is up to date with no
flags, whatever config made it; given `--config/--set`, against that config
instead, which answers "what would re-run with this config".

Rendering needs no system package: the terminal gets a text tree, the image is
drawn with matplotlib, and a Mermaid file (`lineage.mmd`) serves Markdown docs.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import yaml

from refinery.flows.config import config_model, load_config
from refinery.flows.graph import Graph, active, input_digest, staleness
from refinery.storage.layout import RunLayout
from refinery.storage.manifest import read_manifest
from refinery.storage.outputs import Checkpoint

Status = Literal["ok", "stale", "missing", "superseded", "changed"]
IMAGE_NAME = "lineage.png"
MERMAID_NAME = "lineage.mmd"
RECORDED_CONFIG_NAME = "config.yaml"
COLORS = {
    "ok": "#8fd19e",
    "stale": "#f5b971",
    "missing": "#d9d9d9",
    "superseded": "#eeeeee",
    "changed": "#f5b971",
}


@dataclass
class Node:
    """One box of the graph: a source root, a stage or a registered model version."""

    id: str
    kind: Literal["source", "stage", "model"]
    label: str
    status: Status
    reasons: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LineageGraph:
    """Nodes in drawing order (sources, stages, models) and the edges between them."""

    root: Path
    nodes: list[Node]
    edges: list[tuple[str, str]]
    run_args: list[str] = field(default_factory=list)  # `--source`/`--config` options to repeat in the re-run command

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    @property
    def stages(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "stage"]

    def stale_stages(self) -> list[str]:
        """Stages that `refinery run` would (re)do: stale or never completed."""
        return [n.label for n in self.stages if n.status in ("stale", "missing")]

    def first_stale(self) -> str | None:
        stale = self.stale_stages()
        return stale[0] if stale else None

    def rerun_command(self) -> str | None:
        """The command that re-runs exactly the stale part (from the first stale stage on)."""
        first = self.first_stale()
        if not first:
            return None
        return " ".join(["refinery run", *self.run_args, "--root", str(self.root), "--from", first])


# --------------------------------------------------------------------------- building

INPUT_REASONS = ("sources changed", "input changed", "an input stage has not completed")


def _source_changes(layout: RunLayout, sources: list[str], cfg: Any) -> dict[str, dict[str, int]]:
    """Per source: files new, changed (size or mtime) and removed since the last ingest, from its file index."""
    from refinery.tasks.ingest import list_sources
    from refinery.tasks.ingest.stage import INDEX_FILE
    from refinery.tasks.provenance import root_of, source_roots

    roots = source_roots(sources)
    index_path = layout.stage_dir("ingest") / INDEX_FILE
    before: dict[str, tuple[int, int]] = {}
    if index_path.is_file():
        for row in pq.read_table(index_path, columns=["source", "size", "mtime_ns"]).to_pylist():
            before[row["source"]] = (row["size"], row["mtime_ns"])
    out = {r: {"files": 0, "new": 0, "changed": 0, "removed": 0} for r in roots}
    now: set[str] = set()
    for sf in list_sources(sources, cfg.ingest):
        now.add(sf.uri)
        c = out.setdefault(root_of(sf.uri, roots), {"files": 0, "new": 0, "changed": 0, "removed": 0})
        c["files"] += 1
        if sf.uri not in before:
            c["new"] += 1
        elif before[sf.uri] != (sf.size, sf.mtime_ns):
            c["changed"] += 1
    for uri in set(before) - now:
        root = root_of(uri, roots)
        if root in out:
            out[root]["removed"] += 1
    return out


def stage_nodes(layout: RunLayout, sources: list[str], cfg: Any, graph: Graph | None = None) -> list[Node]:
    """One node per stage with its status and why, judged by the same check as the skip decision."""
    graph = graph or active()
    nodes: list[Node] = []
    digests: dict[str, str] = {}  # output digests of completed stages
    stale: dict[str, str] = {}  # stage -> the first stale stage at or above it
    for stage in graph.stages:
        stage_dir = layout.stage_dir(stage.name)
        manifest = read_manifest(stage_dir)
        section = getattr(cfg, stage.name)
        if stage.reads_sources is not None:
            expected: str | None = stage.reads_sources(sources, section)
        elif all(i in digests for i in stage.inputs):
            expected = input_digest(stage, digests)
        else:
            expected = None
        reasons = staleness(stage, stage_dir, manifest, expected, section, cfg.execution.verify)
        upstream = next((stale[i] for i in stage.inputs if i in stale), None)
        info: dict[str, Any] = {}
        if manifest is None:
            status: Status = "missing"
        else:
            if upstream:  # after the input reasons, before config and code: the order a reader follows
                first = [r for r in reasons if r in INPUT_REASONS]
                reasons = [*first, f"upstream stage {upstream} is stale", *[r for r in reasons if r not in first]]
            info = {
                "in": manifest.counts.in_, "kept": manifest.counts.kept, "dropped": manifest.counts.dropped_total,
                "input_digest": manifest.input_digest, "output_digest": manifest.output_digest,
                "config_hash": manifest.config_hash, "created_at": manifest.created_at,
            }
            digests[stage.name] = manifest.output_digest
            status = "stale" if reasons else "ok"
        if status != "ok":
            stale[stage.name] = upstream or stage.name
        nodes.append(Node(f"stage:{stage.name}", "stage", stage.name, status, reasons, info))
    return nodes


def source_nodes(layout: RunLayout, sources: list[str], cfg: Any) -> list[Node]:
    nodes = []
    for root, c in _source_changes(layout, sources, cfg).items():
        moved = {k: c[k] for k in ("new", "changed", "removed") if c[k]}
        reasons = [f"{n} file(s) {k} since the last ingest" for k, n in moved.items()]
        label = root.removeprefix("file://")
        nodes.append(Node(f"source:{root}", "source", label, "changed" if moved else "ok", reasons, {"uri": root, **c}))
    return nodes


def model_nodes(client: Any, registered_model: str, train: Node) -> list[Node]:
    """One node per registered version of `registered_model`, newest first."""
    versions = client.search_model_versions(f"name = '{registered_model}'")
    nodes = []
    for mv in sorted(versions, key=lambda v: -int(v.version)):
        produced_by = mv.tags.get("refinery.output_digest", "")
        info = {
            "version": str(mv.version), "run_id": mv.run_id, "output_digest": produced_by,
            "input_digest": mv.tags.get("refinery.input_digest", ""), "uri": f"models:/{registered_model}/{mv.version}",
            "parent_model": mv.tags.get("refinery.parent_model", ""),
            "parent_output_digest": mv.tags.get("refinery.parent_output_digest", ""),
        }
        if train.info.get("output_digest") != produced_by:
            status: Status = "superseded"
            reasons = ["trained on an earlier training-stage output"]
        elif train.status != "ok":
            status, reasons = "stale", [f"train stage is stale: {'; '.join(train.reasons)}"]
        else:
            status, reasons = "ok", []
        nodes.append(Node(f"model:{mv.version}", "model", f"{registered_model} v{mv.version}", status, reasons, info))
    return nodes


def parent_edges(models: list[Node], registered_model: str) -> list[tuple[str, str]]:
    """Edges from the version a continued model started from (`train.init_from`) to that model.

    The parent is the version named by the `refinery.parent_model` tag, else the version
    whose training output digest is the recorded `refinery.parent_output_digest`.
    """
    by_version = {m.info["version"]: m for m in models}
    by_digest = {m.info["output_digest"]: m for m in models if m.info.get("output_digest")}
    edges = []
    for m in models:
        name, _, version = m.info.get("parent_model", "").rpartition("/")
        parent = by_version.get(version) if name == registered_model else None
        parent = parent or by_digest.get(m.info.get("parent_output_digest", ""))
        if parent is not None and parent is not m:
            m.info["parent"] = parent.label
            edges.append((parent.id, m.id))
    return edges


def _stage_run_ids(client: Any, experiment: str, stages: list[Node]) -> None:
    """Attach, to each stage node, the MLflow run that recorded its current manifest."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    runs = client.search_runs([exp.experiment_id], "tags.`refinery.kind` = 'stage'", max_results=5000,
                              order_by=["attributes.start_time DESC"])
    for node in stages:
        digest = node.info.get("output_digest")
        for run in runs:
            if digest and run.data.tags.get("refinery.output_digest") == digest \
                    and run.data.tags.get("refinery.stage") == node.label:
                node.info["mlflow_run_id"] = run.info.run_id
                break


def tracking_uri(layout: RunLayout, cfg: Any) -> str:
    return layout.tracking_uri(cfg.tracking.mlflow_uri)


def pipeline_runs(client: Any, experiment_id: str, layout: RunLayout, most: int = 500) -> list[Any]:
    """The pipeline runs of this root, newest first: a shared tracking server holds the runs of many roots.

    Runs without the `refinery.root` tag (made before it) count as this root's.
    """
    runs = client.search_runs([experiment_id], "tags.`refinery.kind` = 'pipeline'", max_results=most,
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if r.data.tags.get("refinery.root", str(layout.root)) == str(layout.root)]


def recorded_sources(layout: RunLayout, cfg: Any, graph: Graph | None = None) -> list[str]:
    """The sources of the last pipeline run of this root that read them, from its MLflow parent run.

    A later run of, say, `--stages filter` did not read the sources, so the last run whose stages include
    one that reads them is the one that says what was ingested. Empty when there is none.
    """
    if not layout.has_tracking(cfg.tracking.mlflow_uri):
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(layout, cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    mine = [r for r in pipeline_runs(client, exp.experiment_id, layout) if r.data.params.get("sources")]
    readers = {s.name for s in (graph or active()).stages if s.reads_sources is not None}
    chosen = next((r for r in mine if "stages" not in r.data.params
                   or readers & set(r.data.params["stages"].split(","))), mine[0] if mine else None)
    value = chosen.data.params["sources"] if chosen is not None else ""
    return [s for s in value.split(",") if s]


def recorded_config(layout: RunLayout, graph: Graph | None = None) -> Any:
    """The config each stage last ran with, read from its manifest; defaults for the rest.

    Sections are read one by one, as recorded: a stage whose recorded section no longer validates (its code
    changed) keeps the default, and shows as stale for it. `tracking` and `execution` are not recorded and
    take their defaults (and `$MLFLOW_TRACKING_URI`).
    """
    from pydantic import ValidationError

    graph = graph or active()
    cfg = config_model(graph)()
    for stage in graph.stages:
        manifest = read_manifest(layout.stage_dir(stage.name))
        if manifest is None:
            continue
        try:
            setattr(cfg, stage.name, stage.config_model.model_validate(manifest.config))
        except ValidationError:
            continue
    return cfg


def config_tree(cfg: Any, graph: Graph | None = None) -> dict[str, Any]:
    """The stage sections of `cfg`, as a YAML file for `refinery run --config` holds them."""
    return {s.name: getattr(cfg, s.name).model_dump(mode="json") for s in (graph or active()).stages}


def build_graph(
    root: str | os.PathLike[str], sources: list[str], cfg: Any | None = None, use_mlflow: bool = True
) -> LineageGraph:
    """The lineage graph of a run root, judged against `sources` and `cfg` as they are now."""
    graph = active()
    cfg = cfg or config_model(graph)()
    layout = RunLayout.at(root)
    src = source_nodes(layout, sources, cfg)
    stages = stage_nodes(layout, sources, cfg, graph)
    models: list[Node] = []
    trained = graph.producing(Checkpoint, required=False)
    if use_mlflow and (layout.has_tracking(cfg.tracking.mlflow_uri)):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(layout, cfg))
        _stage_run_ids(client, cfg.tracking.experiment, stages)
        if trained is not None:
            models = model_nodes(client, cfg.tracking.registered_model, next(n for n in stages if n.label == trained.name))
    edges = [(s.id, f"stage:{st.name}") for s in src for st in graph.stages if st.reads_sources is not None]
    edges += [(f"stage:{a}", f"stage:{b}") for a, b in graph.edges()]
    edges += [(f"stage:{trained.name}", m.id) for m in models if trained is not None]
    edges += parent_edges(models, cfg.tracking.registered_model)
    return LineageGraph(layout.root, [*src, *stages, *models], edges)


# --------------------------------------------------------------------------- rendering

_MARK = {"ok": "✓", "stale": "✗ STALE", "missing": "· not run", "superseded": "superseded", "changed": "changed"}


def render_text(graph: LineageGraph) -> str:
    """The graph for the terminal: sources, the stage chain, the model versions, and what to re-run."""
    lines = [f"Lineage of {graph.root}", ""]
    for n in graph.nodes:
        if n.kind == "source":
            lines.append(f"source  {n.label}  ({n.info.get('files', 0)} files)  {_MARK[n.status]}")
            lines += [f"          {r}" for r in n.reasons]
    for n in graph.stages:
        counts = f"{n.info['in']:>8,} in {n.info['kept']:>8,} kept" if n.info else " " * 25
        digest = n.info.get("output_digest", "")[:12]
        lines.append(f"  └─ {n.label:<10} {counts}  {digest:<12}  {_MARK[n.status]}")
        lines += [f"        {r}" for r in n.reasons if n.status == "stale"]
    for n in graph.nodes:
        if n.kind == "model":
            parent = f"  continued from {n.info['parent']}" if n.info.get("parent") else ""
            lines.append(f"       └─ model {n.label}  ({n.info['uri']})  {_MARK[n.status]}{parent}")
    lines.append("")
    command = graph.rerun_command()
    if command:
        lines.append(f"Stale: {', '.join(graph.stale_stages())}. Re-run exactly that part with:")
        lines.append(f"  {command}")
    else:
        lines.append("Everything is up to date: running the pipeline now would skip every stage.")
    return "\n".join(lines)


def render_mermaid(graph: LineageGraph) -> str:
    """A Mermaid flowchart of the graph, for Markdown docs."""
    ids = {n.id: f"n{i}" for i, n in enumerate(graph.nodes)}
    out = ["flowchart LR"]
    for n in graph.nodes:
        text = n.label if n.kind != "source" else Path(n.label).name or n.label
        if n.kind == "stage" and n.info:
            text += f"<br/>{n.info['kept']:,} kept"
        text += f"<br/>{n.status}"
        shape = ("[(", ")]") if n.kind == "source" else ("([", "])") if n.kind == "model" else ("[", "]")
        out.append(f'    {ids[n.id]}{shape[0]}"{text}"{shape[1]}:::{n.status}')
    for a, b in graph.edges:
        out.append(f"    {ids[a]} --> {ids[b]}")
    for status, color in COLORS.items():
        out.append(f"    classDef {status} fill:{color},stroke:#555")
    return "\n".join(out) + "\n"


def render_png(graph: LineageGraph, path: str | os.PathLike[str]) -> Path:
    """Draw the graph left to right with matplotlib (no Graphviz needed); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Patch

    from refinery.storage.atomic import atomic_path

    sources = [n for n in graph.nodes if n.kind == "source"]
    models = [n for n in graph.nodes if n.kind == "model"]
    pos: dict[str, tuple[float, float]] = {}
    for i, n in enumerate(sources):
        pos[n.id] = (0.0, (len(sources) - 1) / 2 - i)
    graph_ = active()
    depth = graph_.depths()
    columns: dict[int, list[str]] = {}
    for name in graph_.names:
        columns.setdefault(depth[name], []).append(name)
    for d, names in columns.items():
        for j, name in enumerate(names):
            pos[f"stage:{name}"] = (d + 1.0, 1.1 * ((len(names) - 1) / 2 - j))
    trained = graph_.producing(Checkpoint, required=False)
    train_x = pos[f"stage:{trained.name}"][0] if trained is not None else max(p[0] for p in pos.values())
    for i, n in enumerate(models):
        pos[n.id] = (train_x + 1.0 + 1.0 * (i // 3), -1.1 - 0.8 * (i % 3))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    fig, ax = plt.subplots(figsize=(1.6 * (max(xs) - min(xs) + 1.5), 1.5 * (max(ys) - min(ys) + 2.0)))
    w, h = 0.8, 0.55
    patches = {}
    for n in graph.nodes:
        if n.id not in pos:
            continue
        x, y = pos[n.id]
        style = "round,pad=0.02,rounding_size=0.15" if n.kind != "stage" else "square,pad=0.02"
        patches[n.id] = patch = FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle=style, facecolor=COLORS[n.status],
            edgecolor="#c0392b" if n.status == "stale" else "#555", linewidth=2.0 if n.status == "stale" else 1.0,
        )
        ax.add_patch(patch)
        if n.kind == "source":
            title, sub = Path(n.label).name or n.label, f"{n.info.get('files', 0)} files"
        elif n.kind == "stage":
            title = n.label
            sub = f"{n.info['kept']:,} kept · {n.info['output_digest'][:8]}" if n.info else "not run"
        else:
            title, sub = n.label, n.status
        ax.text(x, y + 0.09, title, ha="center", va="center", fontsize=8.5, weight="bold")
        ax.text(x, y - 0.13, sub, ha="center", va="center", fontsize=6.5)
    for a, b in graph.edges:
        if a in patches and b in patches:
            skips = abs(pos[b][0] - pos[a][0]) > 1.01 and abs(pos[b][1] - pos[a][1]) < 0.01  # bend over the boxes between
            ax.annotate("", xy=pos[b], xytext=pos[a], arrowprops={
                "arrowstyle": "-|>", "color": "#555", "lw": 1.2, "patchA": patches[a], "patchB": patches[b],
                "shrinkA": 1, "shrinkB": 1, "connectionstyle": f"arc3,rad={-0.35 if skips else 0.0}"})
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    shown = sorted({n.status for n in graph.nodes}, key=list(COLORS).index)
    ax.legend(handles=[Patch(facecolor=COLORS[s], edgecolor="#555", label=s) for s in shown],
              loc="lower left", fontsize=7, frameon=False, ncol=len(shown))
    first = graph.first_stale()
    ax.set_title(f"Refinery lineage: {'stale from ' + first if first else 'up to date'}", fontsize=10)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def log_to_mlflow(graph: LineageGraph, layout: RunLayout, cfg: Any, files: list[Path]) -> str | None:
    """Log the rendered files under `lineage/` of the root's latest pipeline run; returns that run's id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(layout, cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    runs = pipeline_runs(client, exp.experiment_id, layout)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="lineage")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "lineage.txt"
        text.write_text(render_text(graph), encoding="utf-8")
        client.log_artifact(run_id, str(text), artifact_path="lineage")
    return run_id


def record_provenance(layout: RunLayout, sources: list[str], client: Any, run_id: str) -> Path:
    """Write `train/provenance.parquet` (training tokens per source file) and log it with the model's run.

    Logged under `provenance/` of `run_id` (the train stage's MLflow run, which holds the
    registered model), with the token totals per format and per source root as metrics.
    """
    from refinery.tasks.provenance import provenance_table, summarize, write_provenance

    out = write_provenance(layout.stage_dir("shards"), layout.stage_dir("train"), sources)
    path = layout.stage_dir("train") / out.path
    client.log_artifact(run_id, str(path), artifact_path="provenance")
    table = provenance_table(layout.stage_dir("shards"), sources)
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(f"provenance.tokens.format.{r['format']}", float(r["tokens"]), ts, 0)  # type: ignore[arg-type]
               for r in summarize(table, "format")]
    metrics += [Metric(f"provenance.tokens.root.{i}", float(r["tokens"]), ts, 0)  # type: ignore[arg-type]
                for i, r in enumerate(summarize(table, "source_root"))]
    if metrics:
        client.log_batch(run_id, metrics=metrics[:900])
    return path


def main(
    root: str | os.PathLike[str] = ".refinery",
    sources: list[str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    log: bool = True,
    echo: Callable[[str], None] = print,
) -> LineageGraph:
    """Build, print and render the lineage of `root`; the body of `refinery lineage`.

    `sources` default to those of the last pipeline run (recorded in MLflow).
    Without `config_file` and `overrides`, each stage is judged against the
    config it ran with (its manifest's), so an untouched run is up to date
    whatever config made it; with them, against the config `refinery run` would
    use with the same flags (what would re-run with that config). The image, the
    Mermaid file and the recorded config (`config.yaml`, for `--config` to edit
    from) go to `out_dir` (default `<root>/lineage/`) and, with `log`, the
    drawings to the last pipeline run in MLflow.
    """
    layout = RunLayout.at(root)
    if not any(read_manifest(layout.stage_dir(s)) for s in active().names):
        raise FileNotFoundError(f"no stage manifests under {layout.root}; run `refinery run --root {root}` first")
    from refinery.storage.atomic import atomic_write_text

    out = Path(out_dir) if out_dir else layout.root / "lineage"
    recorded = recorded_config(layout)
    recorded_file = out / RECORDED_CONFIG_NAME
    atomic_write_text(recorded_file, yaml.safe_dump(config_tree(recorded), sort_keys=False))
    as_recorded = config_file is None and not overrides
    cfg = recorded if as_recorded else load_config(config_file, overrides or [])
    sources = list(sources or recorded_sources(layout, cfg))
    if not sources:
        raise ValueError(f"the sources of {layout.root} are not recorded; pass them as in `refinery run` (--source PATH)")
    graph = build_graph(layout.root, sources, cfg)
    bundled = str(layout.root / "sample-corpus")
    graph.run_args = [a for s in sources if s != bundled for a in ("--source", shlex.quote(s))]
    if as_recorded and config_tree(recorded) != config_tree(config_model()()):
        config_file = recorded_file  # so the re-run command runs with the config the stages ran with
    graph.run_args += ["--config", shlex.quote(str(config_file))] if config_file else []
    graph.run_args += [a for o in overrides or [] for a in ("--set", shlex.quote(o))]
    echo(render_text(graph))
    echo(f"\nJudged against {'the config each stage ran with' if as_recorded else 'the config given'}; "
         f"the recorded config is in {recorded_file}")
    image = render_png(graph, out / IMAGE_NAME)
    mermaid = out / MERMAID_NAME
    atomic_write_text(mermaid, render_mermaid(graph))
    echo(f"Graph written to {image} and {mermaid}")
    if log and (layout.has_tracking(cfg.tracking.mlflow_uri)):
        run_id = log_to_mlflow(graph, layout, cfg, [image, mermaid])
        if run_id:
            echo(f"Logged to MLflow run {run_id} (artifacts under lineage/)")
    return graph
