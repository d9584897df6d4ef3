"""`precision: auto` follows a measurement of the model's own shapes, cached per machine; explicit settings win."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refinery.model import precision as precision_module
from refinery.model.gpt import config_from_preset
from refinery.model.precision import (
    CACHE_ENV,
    PrecisionProbe,
    cache_file,
    cpu_features,
    cpu_model,
    decide_precision,
    time_one_block,
)
from refinery.model.train import TrainConfig, resolve_precision, train
from refinery.storage.shards import TokenWindows, write_token_shard

CPU = torch.device("cpu")
VOCAB, SEQ = 64, 32

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A private cache folder (through XDG_CACHE_HOME), with the cache switched on."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return tmp_path / "cache"


def probe(**overrides) -> PrecisionProbe:
    return PrecisionProbe.for_model(config_from_preset("test", VOCAB, seq_len=SEQ, **overrides), micro_batch_size=2)


class Timings:
    """A measurement that returns fixed seconds per pass and counts how often it was asked."""

    def __init__(self, bf16: float, fp32: float) -> None:
        self.seconds = {"bf16": bf16, "fp32": fp32}
        self.calls = 0

    def __call__(self, probe: PrecisionProbe, device: torch.device) -> dict[str, float]:
        self.calls += 1
        return dict(self.seconds)


def test_auto_picks_the_faster_precision_as_measured(cache_home):
    faster_bf16 = decide_precision("auto", CPU, probe(), Timings(bf16=0.01, fp32=0.03), use_cache=False)
    assert (faster_bf16.precision, faster_bf16.source) == ("bf16", "measured")
    assert faster_bf16.timings_s == {"bf16": 0.01, "fp32": 0.03}
    faster_fp32 = decide_precision("auto", CPU, probe(), Timings(bf16=0.05, fp32=0.02), use_cache=False)
    assert faster_fp32.precision == "fp32"
    assert "bf16 50.0 ms" in faster_fp32.describe() and "fp32 20.0 ms" in faster_fp32.describe()
    assert resolve_precision("auto", CPU, probe(), Timings(bf16=0.01, fp32=0.02)) == "bf16"


def test_the_choice_is_cached_per_machine_and_keyed_by_the_shapes(cache_home):
    slow_bf16 = Timings(bf16=0.05, fp32=0.02)
    assert decide_precision("auto", CPU, probe(), slow_bf16).source == "measured"
    path = cache_file()
    assert path is not None and path.is_relative_to(cache_home / "refinery")
    [(key, entry)] = json.loads(path.read_text()).items()
    assert f"torch {torch.__version__}" in key and "d_model=64" in key and f"vocab_size={VOCAB}" in key
    assert entry["precision"] == "fp32"

    # The same shapes again: answered from the cache, whatever a new measurement would say.
    again = decide_precision("auto", CPU, probe(), Timings(bf16=0.001, fp32=1.0))
    assert (again.precision, again.source, slow_bf16.calls) == ("fp32", "cached", 1)
    assert again.timings_s == {"bf16": 0.05, "fp32": 0.02}

    # Other shapes are another key: measured afresh, and both answers kept.
    wider = decide_precision("auto", CPU, probe(d_model=128), Timings(bf16=0.001, fp32=1.0))
    assert (wider.precision, wider.source) == ("bf16", "measured")
    assert len(json.loads(path.read_text())) == 2


AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 sha_ni\n"
ZEN4_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 avx512f avx512_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd crc32 bf16 sve\nCPU part\t: 0xd40\n"


def test_cpus_with_one_model_name_and_other_bf16_features_are_cached_apart(cache_home, monkeypatch):
    assert cpu_model(AVX2_EPYC) == cpu_model(ZEN4_EPYC) == "AMD EPYC"  # what many VMs report
    assert (cpu_features(AVX2_EPYC), cpu_features(ZEN4_EPYC)) == ("avx2", "avx2+avx512f+avx512_bf16")
    assert cpu_features(ARM) == "asimd+bf16+sve" and cpu_features("") == "unknown"

    # A cache shared between the two (one image, one home folder): each machine measures its own answer.
    monkeypatch.setattr(precision_module, "_cpuinfo", lambda: AVX2_EPYC)
    assert decide_precision("auto", CPU, probe(), Timings(bf16=2.0, fp32=0.1)).precision == "fp32"
    monkeypatch.setattr(precision_module, "_cpuinfo", lambda: ZEN4_EPYC)
    on_zen4 = decide_precision("auto", CPU, probe(), Timings(bf16=0.03, fp32=0.04))
    assert (on_zen4.precision, on_zen4.source) == ("bf16", "measured")
    monkeypatch.setattr(precision_module, "_cpuinfo", lambda: AVX2_EPYC)
    assert decide_precision("auto", CPU, probe(), Timings(bf16=0.001, fp32=1.0)).source == "cached"


def test_the_cache_can_be_switched_off(cache_home, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_file() is None
    timings = Timings(bf16=0.05, fp32=0.02)
    for _ in range(2):
        assert decide_precision("auto", CPU, probe(), timings).source == "measured"
    assert timings.calls == 2
    assert not (cache_home / "refinery").exists()


def test_a_damaged_cache_is_measured_again(cache_home):
    (cache_home / "refinery").mkdir(parents=True)
    (cache_home / "refinery" / "precision.json").write_text("{not json")
    assert decide_precision("auto", CPU, probe(), Timings(bf16=0.01, fp32=0.02)).source == "measured"


def test_explicit_settings_win_and_are_never_measured(cache_home):
    never = Timings(bf16=0.0, fp32=1.0)
    for precision in ("bf16", "fp32"):
        choice = decide_precision(precision, CPU, probe(), never)
        assert (choice.precision, choice.source) == (precision, "explicit")
    assert never.calls == 0
    with pytest.raises(ValueError, match="CUDA"):
        decide_precision("fp16", CPU, probe(), never)
    assert not (cache_home / "refinery").exists()


def test_the_real_measurement_times_both_precisions():
    timings = time_one_block(probe(), CPU)
    assert set(timings) == {"bf16", "fp32"} and all(0 < t < 60 for t in timings.values())


def test_a_training_run_reports_the_measured_choice(cache_home, tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB - 1, size=int(n)).astype(np.uint16) for n in rng.integers(20, 60, size=40)]
    write_token_shard(tmp_path / "train.arrow", [f"d{i}" for i in range(30)], docs[:30], VOCAB)
    write_token_shard(tmp_path / "val.arrow", [f"d{i}" for i in range(30, 40)], docs[30:], VOCAB)
    cfg = TrainConfig(preset="test", seq_len=SEQ, micro_batch_size=2, tokens_per_step=2 * SEQ, max_steps=2,
                      warmup_steps=1, eval_every=2, eval_batches=1, device="cpu", max_time_s=None)  # fmt: skip
    result = train(cfg, VOCAB, TokenWindows([tmp_path / "train.arrow"], SEQ), TokenWindows([tmp_path / "val.arrow"], SEQ),
                   tmp_path / "out", progress=False)  # fmt: skip
    assert result.precision_source == "measured"
    assert result.precision == min(result.precision_timings_s, key=result.precision_timings_s.get)
    again = train(cfg.model_copy(update={"max_steps": 3}), VOCAB, TokenWindows([tmp_path / "train.arrow"], SEQ),
                  TokenWindows([tmp_path / "val.arrow"], SEQ), tmp_path / "out2", progress=False)  # fmt: skip
    assert (again.precision, again.precision_source) == (result.precision, "cached")
