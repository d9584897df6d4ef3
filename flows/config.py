"""The typed pipeline configuration: defaults that run, a YAML file over them, flags over that.

Each stage owns its config model beside its code; this module only composes
them, so `refinery run --set filter.gopher_quality.min_words=80` and a YAML
file address the same keys. Unknown keys and bad values are errors that name
the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from refinery.model.train import TrainConfig
from refinery.tasks.dedup import DedupConfig
from refinery.tasks.encode import ShardsConfig
from refinery.tasks.evaluate import EvalConfig
from refinery.tasks.filter import FilterConfig
from refinery.tasks.ingest import IngestConfig
from refinery.tasks.tokenizer import TokenizerConfig


class TrackingConfig(BaseModel):
    """Where lineage goes. Empty URIs mean the embedded stores inside the run root."""

    model_config = ConfigDict(extra="forbid")

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db"
    )
    experiment: str = "refinery"
    registered_model: str = "refinery-lm"


class ExecutionConfig(BaseModel):
    """How the CPU-heavy maps run: in process, or on a Dask cluster."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "dask"] = "local"
    dask_address: str | None = Field(None, description="scheduler address, e.g. tcp://10.0.0.5:8786; none starts a local cluster")
    progress: bool = True


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @model_validator(mode="after")
    def _one_validation_split(self) -> PipelineConfig:
        """The tokenizer measures compression on the same validation split the shards stage holds out.

        Setting `val_fraction` in either section sets both; setting both to different values is an error.
        """
        tok_set = "val_fraction" in self.tokenizer.model_fields_set
        shards_set = "val_fraction" in self.shards.model_fields_set
        if tok_set and shards_set and self.tokenizer.val_fraction != self.shards.val_fraction:
            raise ValueError(
                f"tokenizer.val_fraction ({self.tokenizer.val_fraction}) and shards.val_fraction "
                f"({self.shards.val_fraction}) must be equal: set one of them"
            )
        if shards_set and not tok_set:
            self.tokenizer.val_fraction = self.shards.val_fraction
        elif tok_set and not shards_set:
            self.shards.val_fraction = self.tokenizer.val_fraction
        return self


class ConfigError(ValueError):
    """A config problem, with every offending key named."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3, 0.5, true, [en] get their types)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.max_steps=200")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def _apply(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(file: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
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
    for item in overrides or []:
        path_parts, value = parse_override(item)
        _apply(tree, path_parts, value)
    return validate_config(tree)


def validate_config(tree: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
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
    return yaml.safe_dump(PipelineConfig().model_dump(mode="json"), sort_keys=False)
