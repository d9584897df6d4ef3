"""`train.preset: auto`: the size chosen for the corpus and the budget, and how the stage keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinery.model import sizing
from refinery.model.sizing import choose, effective_data, effective_params, predicted_loss
from refinery.model.train import TrainConfig

PARAMS = {"small": 1_000_000, "medium": 4_000_000, "large": 16_000_000}
LADDER = list(PARAMS)
# Tokens per second of each size here: a 4x bigger model trains about 3x slower.
SPEED = {"small": 30_000.0, "medium": 10_000.0, "large": 3_300.0}


def test_repeated_data_and_excess_parameters_are_worth_less() -> None:
    unique = 1_000_000
    assert effective_data(500_000, unique) == 500_000  # under one epoch nothing is discounted
    four, forty = effective_data(4 * unique, unique), effective_data(40 * unique, unique)
    assert unique < four < 4 * unique and four < forty < 40 * unique
    assert effective_data(10_000 * unique, unique) < (1 + sizing.R_STAR_D) * unique + 1  # saturates
    assert effective_params(10_000, unique) == 10_000  # within what the data supports
    assert effective_params(10**9, unique) < (1 + sizing.R_STAR_N) * unique / sizing.TOKENS_PER_PARAM + 1
    # More of either never predicts a higher loss.
    assert predicted_loss(2e6, 1e7, 1e7) < predicted_loss(1e6, 1e7, 1e7)
    assert predicted_loss(1e6, 2e7, 1e9) < predicted_loss(1e6, 1e7, 1e9)


def test_a_short_budget_on_a_small_corpus_picks_the_fast_small_model() -> None:
    choice = choose(LADDER, PARAMS, unique_tokens=600_000, max_tokens=10**9, budget_s=150, speed=SPEED.__getitem__)
    assert choice.preset == "small"
    assert [c.preset for c in choice.candidates][0] == "small" and choice.candidates[0].tokens == 4_500_000
    assert "small" in choice.describe() and "tok/s" in choice.describe()


def test_a_long_budget_on_a_large_corpus_picks_a_bigger_model() -> None:
    choice = choose(LADDER, PARAMS, unique_tokens=10**10, max_tokens=10**12, budget_s=3600 * 24,
                    speed=SPEED.__getitem__)  # fmt: skip
    assert choice.preset == "large"
    preds = [c.predicted for c in choice.candidates]
    assert preds == sorted(preds, reverse=True)


def test_the_speed_search_stops_at_the_first_size_predicted_worse() -> None:
    asked: list[str] = []

    def speed(preset: str) -> float:
        asked.append(preset)
        return SPEED[preset]

    choose(LADDER, PARAMS, unique_tokens=600_000, max_tokens=10**9, budget_s=150, speed=speed)
    assert asked == ["small", "medium"]  # medium already predicted worse: large is not built


def test_without_a_budget_the_largest_size_with_20_tokens_per_parameter() -> None:
    assert choose(LADDER, PARAMS, 10**9, max_tokens=100_000_000, budget_s=None).preset == "medium"
    tiny = choose(LADDER, PARAMS, 10**9, max_tokens=1_000_000, budget_s=None)
    assert tiny.preset == "small" and "smallest" in tiny.rule


def test_auto_is_the_default_and_must_be_resolved_before_building_a_model() -> None:
    cfg = TrainConfig()
    assert cfg.preset == "auto" and cfg.early_stop_patience == "auto"
    with pytest.raises(ValueError, match="resolve"):
        cfg.model_config_for(512)
    with pytest.raises(ValueError, match="auto or one of"):
        TrainConfig(preset="huge")


def test_resolve_preset_measures_the_candidates_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sizing.LADDERS, "cpu", ("test", "cpu-tiny"))
    monkeypatch.setenv("REFINERY_PRECISION_CACHE", "off")
    cfg = TrainConfig(device="cpu", precision="fp32", micro_batch_size=2, tokens_per_step=512, max_time_s=30)
    resolved, choice = sizing.resolve_preset(cfg, vocab_size=512, train_tokens=20_000)
    assert choice is not None and resolved.preset == choice.preset
    assert [c.preset for c in choice.candidates][0] == "test"
    assert all(c.tokens_per_s and c.tokens_per_s > 0 for c in choice.candidates)
    assert resolved.max_time_s < 30 and resolved.max_time_s == pytest.approx(30 - choice.seconds)
    # The candidates that cannot split tokens_per_step into whole micro-batches are left out.
    odd = TrainConfig(device="cpu", precision="fp32", micro_batch_size=2, tokens_per_step=128, max_time_s=30)
    only, which = sizing.resolve_preset(odd, vocab_size=512, train_tokens=20_000)
    assert which is not None and [c.preset for c in which.candidates] == ["test"] and only.preset == "test"
    pinned = TrainConfig(preset="test")
    assert sizing.resolve_preset(pinned, 512, 20_000) == (pinned, None)


def test_the_stage_keeps_its_choice_for_a_resumed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refinery.tasks import train as stage

    monkeypatch.setitem(sizing.LADDERS, "cpu", ("test",))
    monkeypatch.setenv("REFINERY_PRECISION_CACHE", "off")
    cfg = TrainConfig(device="cpu", precision="fp32", micro_batch_size=2, tokens_per_step=128, max_time_s=30)
    first, record = stage._resolve_preset(cfg, 512, 20_000, tmp_path, None)
    assert first.preset == "test" and (tmp_path / stage.SIZING_FILE).is_file()
    saved = json.loads((tmp_path / stage.SIZING_FILE).read_text())
    saved["update"]["preset"] = "cpu-tiny"  # what an earlier measurement chose is what the resumed run trains
    (tmp_path / stage.SIZING_FILE).write_text(json.dumps(saved))
    again, _ = stage._resolve_preset(cfg, 512, 20_000, tmp_path, None)
    assert again.preset == "cpu-tiny" and record["describe"].startswith("preset auto: test")
