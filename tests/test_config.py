"""The typed config: defaults validate, file then flags override, bad keys and values are named."""

from __future__ import annotations

import pytest

from refinery.flows.config import ConfigError, PipelineConfig, load_config, parse_override


def test_defaults_validate_and_round_trip() -> None:
    cfg = load_config()
    again = PipelineConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg


def test_file_then_flags_override(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 7\n  lr: 0.01\ndedup:\n  threshold: 0.7\n")
    cfg = load_config(f, ["train.max_steps=9"])
    assert cfg.train.max_steps == 9  # flag wins over file
    assert cfg.train.lr == 0.01  # file wins over default
    assert cfg.dedup.threshold == 0.7


def test_override_values_are_typed() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[en, fr]") == (["a"], ["en", "fr"])


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        load_config(None, ["train.max_stepz=3"])


def test_bad_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dedup\.threshold"):
        load_config(None, ["dedup.threshold=7"])


def test_bad_file_is_reported(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_malformed_set_is_reported() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.max_steps"])


def test_validation_split_is_shared_by_tokenizer_and_shards() -> None:
    assert load_config(None, ["shards.val_fraction=0.2"]).tokenizer.val_fraction == 0.2
    assert load_config(None, ["tokenizer.val_fraction=0.1"]).shards.val_fraction == 0.1
    with pytest.raises(ConfigError, match="must be equal"):
        load_config(None, ["tokenizer.val_fraction=0.1", "shards.val_fraction=0.2"])
