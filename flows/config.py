"""The typed pipeline configuration: defaults that run, a YAML file over them, flags over that.

Each stage owns its config model beside its code, and the stage graph
(flows/stages.py) names it; this module only composes the sections the graph
declares, so `refinery run --set filter.gopher_quality.min_words=80` and a YAML
file address the same keys. Unknown keys and bad values are errors that name
the key.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from refinery.flows.graph import Graph, active
from refinery.overrides import ConfigError, apply_overrides, parse_override

__all__ = [
    "ConfigError", "ExecutionConfig", "PipelineConfig", "TrackingConfig", "config_model", "load_config",
    "parse_override", "validate_config",
]


class TrackingConfig(BaseModel):
    """Where lineage goes. Empty URIs mean the embedded stores inside the run root."""

    model_config = ConfigDict(extra="forbid")

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db"
    )
    experiment: str = "refinery"
    registered_model: str = "refinery-lm"
    register_poor_models: bool = Field(
        False, description="register a model even when eval finds it no better than the unigram baseline"
    )
    system_metrics_s: float | None = Field(
        10.0, gt=0, description="seconds between system-metric samples (CPU, memory, disk, network, GPU) "
        "logged to each stage run, plus one at its end; null: off",
    )


class ExecutionConfig(BaseModel):
    """How the CPU-heavy maps run (in process, or on a Dask cluster), how reused outputs are checked, and how
    long a run waits for another run on its root."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "dask"] = "local"
    workers: int = Field(
        1, ge=1, description="with executor=local: processes for the per-batch maps of dedup, filter and shards "
        "(1: in this process; more: a process pool, e.g. the machine's core count)",
    )
    dask_address: str | None = Field(None, description="scheduler address, e.g. tcp://10.0.0.5:8786; none starts a local cluster")
    progress: bool = True
    verify: Literal["sha256", "size"] = Field(
        "sha256", description="how a stage's reused outputs are checked: streamed sha256, or sizes only (huge roots)"
    )
    lock_wait_s: float | None = Field(
        None, ge=0, description="seconds a run waits for another run on the same root to finish before failing; "
        "null: 0 (fail at once, naming the other run) when started by hand, 6 hours when started by a deployment "
        "(refinery schedule, a worker)",
    )


class _PipelineChecks(BaseModel):
    """Checks across stage sections; the sections themselves come from the stage graph."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _one_validation_split(self) -> _PipelineChecks:
        """The tokenizer measures compression on the same validation split the shards stage holds out.

        Setting `val_fraction` in either section sets both; setting both to different values is an error.
        """
        tok, shards = getattr(self, "tokenizer", None), getattr(self, "shards", None)
        if tok is None or shards is None or not hasattr(tok, "val_fraction") or not hasattr(shards, "val_fraction"):
            return self
        tok_set = "val_fraction" in tok.model_fields_set
        shards_set = "val_fraction" in shards.model_fields_set
        if tok_set and shards_set and tok.val_fraction != shards.val_fraction:
            raise ValueError(
                f"tokenizer.val_fraction ({tok.val_fraction}) and shards.val_fraction "
                f"({shards.val_fraction}) must be equal: set one of them"
            )
        if shards_set and not tok_set:
            tok.val_fraction = shards.val_fraction
        elif tok_set and not shards_set:
            shards.val_fraction = tok.val_fraction
        return self


def config_model(graph: Graph | None = None) -> type[BaseModel]:
    """The pipeline's config model: one section per stage of `graph` (default: the active one), then
    `tracking` and `execution`."""
    graph = graph or active()
    return _config_model(tuple((s.name, s.config_model) for s in graph.stages))


@functools.lru_cache(maxsize=16)
def _config_model(sections: tuple[tuple[str, type[BaseModel]], ...]) -> type[BaseModel]:
    fields: dict[str, Any] = {name: (model, Field(default_factory=model)) for name, model in sections}
    fields["tracking"] = (TrackingConfig, Field(default_factory=TrackingConfig))
    fields["execution"] = (ExecutionConfig, Field(default_factory=ExecutionConfig))
    return create_model("PipelineConfig", __base__=_PipelineChecks, **fields)


PipelineConfig = config_model()


def load_config(
    file: str | Path | None = None, overrides: list[str] | None = None, graph: Graph | None = None
) -> Any:
    """Defaults, then the YAML file, then `--set` overrides; validated as a whole."""
    tree: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (ingest:, dedup:, ...)")
        tree = loaded or {}
    apply_overrides(tree, overrides or [])
    return validate_config(tree, graph)


def validate_config(tree: dict[str, Any], graph: Graph | None = None) -> Any:
    """The config `tree` validated against the model of `graph`; errors name every offending key."""
    try:
        return config_model(graph).model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err else ""
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {key}: {msg}{got}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def dump_default_config() -> str:
    """The full default config as YAML, for `refinery config` and the docs."""
    return yaml.safe_dump(config_model()().model_dump(mode="json"), sort_keys=False)
