"""`--set key=value` overrides: one parser for every command (the CLI, the config loader, torchrun's trainer).

Values are read as YAML, so `3`, `0.5`, `true`, `[en, fr]` and `null` get their
types and anything else stays a string. Dotted keys address nested sections.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, with every offending key named."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
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


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `tree[a][b][c] = value`, creating sections on the way."""
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(tree: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """Apply every `KEY=VALUE` of `items` to `tree` in order (later wins); returns `tree`."""
    for item in items:
        path, value = parse_override(item)
        apply_override(tree, path, value)
    return tree
