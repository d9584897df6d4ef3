"""The pipeline's stages run as the flow runs them, minus Prefect: a helper shared by tests.

A stage that `staleness` finds current is skipped; otherwise its declared function
runs on the outputs of the stages it reads, and its manifest is written last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refinery.flows.graph import Graph, StageCall, input_digest, staleness
from refinery.flows.stages import PIPELINE
from refinery.storage.atomic import sweep_temporaries
from refinery.storage.layout import RunLayout
from refinery.storage.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest


def run_stages(
    root: Path, sources: list[str], cfg: Any, stages: tuple[str, ...] | None = None, graph: Graph = PIPELINE,
    ran: list[str] | None = None, executor: Any = None,
) -> dict[str, Any]:
    """Run `stages` (default all) of `graph` in `root`; returns their typed outputs and appends what ran to `ran`."""
    layout = RunLayout.at(root)
    layout.create(graph.names)
    outputs: dict[str, Any] = {}
    for stage in graph.stages:
        if stages is not None and stage.name not in stages:
            continue
        section = getattr(cfg, stage.name)
        inputs = {i: outputs.get(i) or graph[i].output.read(layout.stage_dir(i)) for i in stage.inputs}
        if stage.reads_sources is not None:
            digest = stage.reads_sources(sources, section)
        else:
            digest = input_digest(stage, {i: o.digest for i, o in inputs.items()})
        stage_dir = layout.stage_dir(stage.name)
        previous = read_manifest(stage_dir)
        if previous is not None and not staleness(stage, stage_dir, previous, digest, section):
            outputs[stage.name] = stage.output.from_manifest(stage_dir, previous)
            continue
        if ran is not None:
            ran.append(stage.name)
        (stage_dir / MANIFEST_NAME).unlink(missing_ok=True)
        sweep_temporaries(stage_dir)
        result = stage.run(StageCall(stage_dir, section, inputs, digest, sources, progress=False, executor=executor))
        manifest = build_manifest(stage.name, section, digest, result, {"total": 0.0}, code_version=stage.code_version)
        write_manifest(stage_dir, manifest)
        outputs[stage.name] = stage.output.from_manifest(stage_dir, manifest)
    return outputs
