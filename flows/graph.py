"""What a stage is, and the graph of stages: the vocabulary of flows/stages.py.

A `Stage` names its config model, the stages whose outputs it reads, the
function that runs it and the type of output it hands on. A `Graph` is the
stages in an order where every stage comes after the stages it reads. From it
derive the stage list, the config's sections, the Prefect tasks and their data
graph, lineage edges, freshness and the catalog views; nothing else restates
the pipeline's shape.

Freshness is decided here once, for both the skip decision of `refinery run`
and the staleness shown by `refinery lineage`: a stage is fresh when its
manifest records the same input digest (its inputs' lineage keys, or for a
stage that reads the sources, their digest), the same config hash, the same
stage code version, and its outputs are intact.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from refinery.storage.manifest import Manifest, StageResult, config_hash, stable_hash, verify_outputs
from refinery.storage.outputs import Checkpoint, StageOutput

if TYPE_CHECKING:
    from refinery.storage.catalog import Catalog

OutputT = TypeVar("OutputT", bound=StageOutput)
RESERVED = ("tracking", "execution")


@dataclass(frozen=True)
class View:
    """A DuckDB view over files of a stage's folder, for `refinery inspect`."""

    name: str
    pattern: str  # a glob inside the stage folder, e.g. "part-*.parquet"


@dataclass
class StageCall:
    """What a stage function is given: where to write, its config, and the outputs it reads."""

    dir: Path
    cfg: Any
    inputs: dict[str, StageOutput]
    input_digest: str
    sources: list[str] = field(default_factory=list)
    progress: bool = True
    executor: Executor | None = None
    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    tracking_uri: str | None = None  # the run's MLflow store, for stages that resolve models:/ URIs
    code_version: str | None = None  # the stage's `<name>/<version>`, for outputs that record their digest

    def one(self, kind: type[OutputT]) -> OutputT:
        """The single input of type `kind` (the documents a stage maps, the tokenizer it uses...).

        Looking inputs up by type rather than by stage name lets a declaration
        re-wire a stage (say, insert a stage between filter and tokenizer) without
        touching the stage's code.
        """
        found = [o for o in self.inputs.values() if isinstance(o, kind)]
        if len(found) != 1:
            raise TypeError(
                f"expected exactly one input of type {kind.__name__}, got {len(found)} among {sorted(self.inputs)}"
            )
        return found[0]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once."""

    name: str
    config: type[BaseModel] | Callable[[], type[BaseModel]]  # a model, or a function returning it (rebuilt models)
    inputs: tuple[str, ...]
    run: Callable[[StageCall], StageResult]
    output: type[StageOutput] = StageOutput
    summary: str = ""
    reads_sources: Callable[[list[str], Any], str] | None = None  # the sources' digest, for a stage that reads them
    artifacts: tuple[str, ...] = ()  # files of the stage folder logged to MLflow (charts, metrics)
    views: tuple[View, ...] = ()
    version: int = 1  # bump when the stage's behaviour changes: outputs of an older version are stale
    retry_io: bool = True  # retry the Prefect task on transient I/O errors

    @property
    def config_model(self) -> type[BaseModel]:
        cfg = self.config
        return cfg if isinstance(cfg, type) else cfg()

    @property
    def code_version(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Graph:
    """Stages in an order where each comes after every stage it reads."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for s in self.stages:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", s.name) or s.name in RESERVED:
                raise ValueError(f"stage name {s.name!r}: use lower-case letters, digits and _, not {RESERVED}")
            if s.name in seen:
                raise ValueError(f"stage {s.name!r} is declared twice")
            missing = [i for i in s.inputs if i not in seen]
            if missing:
                raise ValueError(f"stage {s.name!r} reads {missing}, which must be declared before it")
            if not s.inputs and s.reads_sources is None:
                raise ValueError(f"stage {s.name!r} reads neither sources nor other stages")
            seen.add(s.name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(self.names)}")

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def edges(self) -> list[tuple[str, str]]:
        """(reader's input, reader) for every declared read."""
        return [(i, s.name) for s in self.stages for i in s.inputs]

    def downstream(self, name: str) -> list[str]:
        """`name` and every stage that reads it, directly or not, in graph order."""
        out = {name}
        for s in self.stages:
            if out.intersection(s.inputs):
                out.add(s.name)
        return [n for n in self.names if n in out]

    def upstream(self, name: str) -> list[str]:
        """`name` and every stage it reads, directly or not, in graph order."""
        out = {name}
        for s in reversed(self.stages):
            if s.name in out:
                out.update(s.inputs)
        return [n for n in self.names if n in out]

    def producing(self, kind: type[StageOutput], required: bool = True) -> Stage | None:
        """The one stage whose output is of type `kind` (e.g. the trained checkpoint); None if none and not required."""
        found = [s for s in self.stages if issubclass(s.output, kind)]
        if len(found) > 1 or (required and not found):
            raise LookupError(f"{len(found)} stages produce {kind.__name__}: {[s.name for s in found]}")
        return found[0] if found else None

    def select(self, stages: Sequence[str] | None, from_stage: str | None) -> tuple[list[str], set[str]]:
        """Which stages run, and which are forced to re-run (`--from` forces its stage and what reads it)."""
        for name in [*(stages or []), *([from_stage] if from_stage else [])]:
            if name not in self.names:
                raise ValueError(f"unknown stage {name!r}; stages are {', '.join(self.names)}")
        if from_stage:
            selected = self.downstream(from_stage)
            return selected, set(selected)
        return [s for s in self.names if not stages or s in stages], set()

    def catalog_views(self) -> list[tuple[str, str, str]]:
        """(view name, stage, glob) of every declared view; a view without a name takes its stage's."""
        return [(v.name or s.name, s.name, v.pattern) for s in self.stages for v in s.views]

    def catalog(self, root: str | Path) -> Catalog:
        """The DuckDB catalog of a run root with this graph's views (`refinery inspect`)."""
        from refinery.storage.catalog import Catalog

        return Catalog(root, self.catalog_views(), self.names)

    def depths(self) -> dict[str, int]:
        """Longest path from a stage that reads the sources: the column each stage is drawn in."""
        depth: dict[str, int] = {}
        for s in self.stages:
            depth[s.name] = 1 + max((depth[i] for i in s.inputs), default=-1)
        return depth

    def mermaid(self) -> str:
        """The stage graph as a Mermaid flowchart: sources, each stage with its output type, the model."""
        out = ["flowchart LR", '    sources[("raw sources")]']
        for s in self.stages:
            out.append(f'    {s.name}["<b>{s.name}</b><br/>{s.output.__name__}"]')
        for s in self.stages:
            if s.reads_sources is not None:
                out.append(f"    sources --> {s.name}")
        for a, b in self.edges():
            out.append(f"    {a} --> {b}")
        models = [s.name for s in self.stages if issubclass(s.output, Checkpoint)]
        if models:
            out.append('    model(["registered model<br/>MLflow registry"])')
            out += [f"    {name} -.-> model" for name in models]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the active graph

_active: list[Graph] = []


def active() -> Graph:
    """The graph every command runs: the declared pipeline unless `use_graph` set another."""
    if _active:
        return _active[-1]
    from refinery.flows.stages import PIPELINE

    return PIPELINE


@contextlib.contextmanager
def use_graph(graph: Graph) -> Iterator[Graph]:
    """Run commands with `graph` instead of the declared pipeline (an extended pipeline, a test's)."""
    _active.append(graph)
    try:
        yield graph
    finally:
        _active.remove(graph)


# --------------------------------------------------------------------------- freshness


def input_digest(stage: Stage, inputs: dict[str, str]) -> str:
    """A stage's input digest from its inputs' output digests (their lineage keys).

    One input: its digest, so a chain of stages is a hash chain. Several: a
    hash of all of them by name.
    """
    if len(stage.inputs) == 1:
        return inputs[stage.inputs[0]]
    return stable_hash({name: inputs[name] for name in stage.inputs})


def staleness(
    stage: Stage, stage_dir: Path, manifest: Manifest | None, expected_input: str | None, cfg: BaseModel,
    verify: str = "sha256",
) -> list[str]:
    """Why running `stage` now would redo it; empty when its last output can be reused.

    `expected_input` is the input digest the stage would run with now (None
    when an input has not completed). One function serves the skip decision
    and `refinery lineage`.
    """
    if manifest is None:
        return ["never completed in this run root"]
    reasons = []
    if expected_input is None:
        reasons.append("an input stage has not completed")
    elif manifest.input_digest != expected_input:
        reasons.append("sources changed" if stage.reads_sources is not None else "input changed")
    if manifest.config_hash != config_hash(cfg):
        reasons.append("config changed")
    if manifest.code_version != stage.code_version:
        reasons.append(f"stage code changed ({manifest.code_version} -> {stage.code_version})")
    if not verify_outputs(stage_dir, manifest, check_sha256=verify == "sha256"):
        reasons.append("outputs missing or modified")
    return reasons
