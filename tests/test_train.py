"""The training loop: outputs, accumulation, exact resume after SIGKILL, and DDP on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from refinery.model.checkpoint import load_model, load_train_state
from refinery.model.evaluate import unigram_loss
from refinery.model.generate import compile_unavailable
from refinery.model.train import TrainConfig, lr_at, plan_steps, replan_step, train
from refinery.storage.shards import TokenWindows, map_tokens, write_token_shard

VOCAB = 64
SEQ = 32


# Tiny matmuls are fastest, and steadiest on a shared machine, on one thread.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def shards(tmp_path) -> tuple[Path, Path]:
    """Documents that count upward in strides, so the next token is predictable from context."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(120):
        start, stride, n = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(20, 90)
        docs.append(((start + stride * np.arange(n)) % (VOCAB - 1)).astype(np.uint16).tolist() + [VOCAB - 1])
    ids = [f"d{i}" for i in range(len(docs))]
    write_token_shard(tmp_path / "train.arrow", ids[:100], [np.array(d) for d in docs[:100]], VOCAB)
    write_token_shard(tmp_path / "val.arrow", ids[100:], [np.array(d) for d in docs[100:]], VOCAB)
    return tmp_path / "train.arrow", tmp_path / "val.arrow"


def config(**overrides) -> TrainConfig:
    base = dict(
        preset="test", seq_len=SEQ, micro_batch_size=4, tokens_per_step=4 * SEQ, max_steps=12, lr=3e-3,
        warmup_steps=2, eval_every=4, eval_batches=2, checkpoint_every=4, precision="fp32", device="cpu",
        max_time_s=None,
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def run(cfg: TrainConfig, shards, out: Path, **kwargs):
    train_path, val_path = shards
    return train(cfg, VOCAB, TokenWindows([train_path], SEQ, seed=cfg.seed), TokenWindows([val_path], SEQ), out,
                 progress=False, **kwargs)  # fmt: skip


def losses(metrics_file: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_config_rejects_bad_values_naming_the_key(shards, tmp_path):
    with pytest.raises(ValidationError, match="micro_batch_size"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(ValidationError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainConfig(learning_rate=1e-3)
    with pytest.raises(ValidationError, match="preset"):
        TrainConfig(preset="giant")
    with pytest.raises(ValueError, match="tokens_per_step"):
        run(config(tokens_per_step=100), shards, tmp_path / "out")


def test_auto_precision_picks_bf16_on_a_cpu_only_with_amx():
    from refinery.model.train import cpu_has_fast_bf16, resolve_precision

    assert cpu_has_fast_bf16("flags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    assert not cpu_has_fast_bf16("flags : fpu avx2 avx512f avx512_bf16")  # dot products only: slower than fp32
    assert not cpu_has_fast_bf16("flags : fpu avx2")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", cpu)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_wsd_holds_the_rate_then_decays_linearly_to_min_lr_at_the_last_step():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, decay_frac=0.2)
    assert cfg.schedule == "wsd"  # the default
    rates = [lr_at(step, cfg) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[10:80] == [1.0] * 70  # stable: a re-planned length changes no rate already used
    decay = rates[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] == pytest.approx(0.1) and decay[0] == pytest.approx(1.0 - 0.9 / 20)
    assert lr_at(49, cfg, total_steps=50) == pytest.approx(0.1)  # a planned schedule ends where it is planned


def test_training_writes_outputs_and_beats_the_unigram_baseline(shards, tmp_path):
    seen: list[tuple[int, dict]] = []
    cfg = config(max_steps=40, eval_every=20, checkpoint_every=20, precision="bf16")
    result = run(cfg, shards, tmp_path / "out", on_metrics=lambda s, m: seen.append((s, m)), bytes_per_token=2.0)
    assert result.steps == 40 and result.tokens_seen == 40 * 4 * SEQ
    assert [s for s, _ in seen] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "mfu"} <= set(seen[0][1])
    assert "val_loss" in seen[19][1] and "val_bpb" in seen[39][1] and "val_loss" not in seen[0][1]
    for name in ("model.safetensors", "config.json", "train_state.pt"):
        assert (result.checkpoint_dir / name).is_file()
    assert result.loss_curve.read_bytes()[:4] == b"\x89PNG"
    assert len(losses(result.metrics_file)) == 40
    state = load_train_state(result.checkpoint_dir)
    assert state["step"] == 40 and state["loader"]["step"] == 40
    train_tokens, val_tokens = (np.concatenate(map_tokens([p])) for p in shards)
    assert result.val_loss < unigram_loss(train_tokens, val_tokens, VOCAB) - 0.5
    model = load_model(result.checkpoint_dir)
    assert model.num_params() == result.num_params


@pytest.mark.skipif(
    compile_unavailable(torch.device("cpu")) is not None, reason=str(compile_unavailable(torch.device("cpu")))
)
def test_compiled_training_follows_eager_training_and_saves_plain_weights(shards, tmp_path):
    eager = run(config(max_steps=4, eval_every=4, checkpoint_every=4), shards, tmp_path / "eager")
    compiled = run(config(max_steps=4, eval_every=4, checkpoint_every=4, compile=True), shards, tmp_path / "compiled")
    a, b = losses(eager.metrics_file), losses(compiled.metrics_file)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([loss for _, loss in a], [loss for _, loss in b], rtol=1e-4)
    weights = load_model(compiled.checkpoint_dir).state_dict()  # loads into a plain GPT: no compile prefixes
    for name, p in load_model(eager.checkpoint_dir).state_dict().items():
        torch.testing.assert_close(weights[name], p, rtol=1e-3, atol=1e-4)


def test_gradient_accumulation_matches_one_large_batch(shards, tmp_path):
    one = run(config(micro_batch_size=8, tokens_per_step=8 * SEQ, max_steps=5), shards, tmp_path / "a")
    accumulated = run(config(micro_batch_size=2, tokens_per_step=8 * SEQ, max_steps=5), shards, tmp_path / "b")
    a, b = losses(one.metrics_file), losses(accumulated.metrics_file)
    np.testing.assert_allclose([loss for _, loss in a], [loss for _, loss in b], rtol=1e-5)
    wa, wb = load_model(one.checkpoint_dir), load_model(accumulated.checkpoint_dir)
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)


def run_process(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group, so a hang takes its children down with it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from refinery.model.train import TrainConfig, train
    from refinery.storage.shards import TokenWindows
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    train_path, val_path, out, kill_at = sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])

    def on_metrics(step, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, 64, TokenWindows([train_path], cfg.seq_len, seed=cfg.seed), TokenWindows([val_path], cfg.seq_len),
          out, on_metrics=on_metrics, progress=False)
    """
)


def test_resume_after_sigkill_repeats_the_uninterrupted_losses_exactly(shards, tmp_path):
    cfg = config(max_steps=12, checkpoint_every=4)
    reference = losses(run(cfg, shards, tmp_path / "ref").metrics_file)

    out = tmp_path / "killed"
    proc = run_process(
        [sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json(), str(shards[0]), str(shards[1]), str(out), "7"],
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert load_train_state(out / "checkpoint")["step"] == 4  # the kill came after the step-4 checkpoint
    assert [s for s, _ in losses(out / "metrics.jsonl")] == list(range(1, 7))  # step 7 died before its log line

    resumed = run(cfg, shards, out)
    assert resumed.steps == 12
    assert losses(resumed.metrics_file) == reference  # bit-identical, steps 1-4 kept and 5-12 recomputed


def test_an_incompatible_checkpoint_is_not_resumed(shards, tmp_path):
    run(config(max_steps=4), shards, tmp_path / "out")
    result = run(config(max_steps=4, lr=1e-3), shards, tmp_path / "out")
    assert [s for s, _ in losses(result.metrics_file)] == [1, 2, 3, 4]  # started afresh, not appended


def test_two_process_ddp_on_cpu_agrees_with_one_process(shards, tmp_path):
    cfg = config(micro_batch_size=2, tokens_per_step=8 * SEQ, max_steps=6, eval_every=3, checkpoint_every=3)
    single = losses(run(cfg, shards, tmp_path / "single").metrics_file)

    config_file = tmp_path / "train.json"
    config_file.write_text(cfg.model_dump_json())
    proc = run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "refinery.model.train", "--train", str(shards[0]), "--val", str(shards[1]),
         "--vocab-size", str(VOCAB), "--out", str(tmp_path / "ddp"), "--config", str(config_file), "--no-progress"],
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = losses(tmp_path / "ddp" / "metrics.jsonl")
    assert [s for s, _ in ddp] == [s for s, _ in single]
    np.testing.assert_allclose([loss for _, loss in ddp], [loss for _, loss in single], rtol=1e-5)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 6


def test_torchrun_set_parses_like_the_config_loader(tmp_path):
    """`--set` on torchrun's command line means what `refinery run --set train.KEY=...` means."""
    from refinery.flows.config import load_config
    from refinery.model.train import config_from_args, main

    items = ["lr=3e-4", "compile=true"]
    cfg = config_from_args(None, items)
    assert cfg == load_config(None, [f"train.{item}" for item in items]).train
    assert cfg.lr == 3e-4 and cfg.compile is True

    json_file = tmp_path / "train.json"
    json_file.write_text(TrainConfig(lr=1e-3, max_time_s=None).model_dump_json())
    assert config_from_args(json_file, ["max_steps=7"]) == TrainConfig(lr=1e-3, max_time_s=None, max_steps=7)
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("lr: 3.0e-4\nmax_time_s: null\n")
    assert config_from_args(yaml_file, ["compile=true"]) == TrainConfig(lr=3e-4, max_time_s=None, compile=True)

    args = ["--train", "none", "--val", "none", "--vocab-size", str(VOCAB), "--out", str(tmp_path / "out")]
    for bad in ("lr", "no_such_key=1", "lr=-1"):  # malformed, unknown, out of range: a usage error, before any data
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--set", bad])
        assert exit_info.value.code == 2


def test_a_time_budget_is_planned_into_the_schedule() -> None:
    cfg = TrainConfig(max_steps=1000, max_time_s=100.0, warmup_steps=50, tokens_per_step=1024, micro_batch_size=4,
                      eval_every=50, eval_batches=2)  # fmt: skip
    # 5 steps took 1 s: about 0.2 s a step (plus evaluations), so about 470 of the 1000 steps fit.
    planned = plan_steps(cfg, step=5, elapsed_s=1.0, steps_timed=5, seq_len=64)
    assert 400 < planned < 480
    assert plan_steps(cfg, step=5, elapsed_s=0.01, steps_timed=5, seq_len=64) == 1000  # plenty of time
    assert plan_steps(cfg.model_copy(update={"max_time_s": None}), 5, 1.0, 5, 64) == 1000
    # The planned schedule decays fully by its end, with a warm-up of at most a fifth of it.
    assert lr_at(planned - 1, cfg, planned) == pytest.approx(cfg.min_lr, rel=1e-3)
    assert lr_at(0, cfg, 100) == pytest.approx(cfg.lr / 20)
    assert lr_at(999, cfg) == pytest.approx(cfg.min_lr, rel=1e-3)  # unplanned: max_steps, as before


def test_the_budget_is_planned_again_from_the_steady_steps_at_the_end_of_the_warm_up(shards, tmp_path, capsys):
    cfg = TrainConfig(max_steps=1000, max_time_s=100.0, warmup_steps=30, tokens_per_step=1024, micro_batch_size=4)
    assert replan_step(cfg, 400) == 30 and replan_step(cfg, 60) == 12  # the planned schedule's warm-up, at least 10
    assert replan_step(cfg, 400, done=1) == 100 and replan_step(cfg, 60, done=1) == 32  # a quarter, 20 past the first
    # wsd plans a third time a step before its decay (the last fifth) starts, at least 20 past the second.
    assert cfg.schedule == "wsd" and replan_step(cfg, 400, done=2) == 319 and replan_step(cfg, 60, done=2) == 52
    assert lr_at(318, cfg, 400) == lr_at(319, cfg, 400) == cfg.lr  # still flat where it re-plans
    # The first 5 steps took 2 s (warm-up allocations); the 25 after them 2.5 s: 0.1 s a step, not 0.4.
    first = plan_steps(cfg, step=5, elapsed_s=2.0, steps_timed=5, seq_len=64)
    again = plan_steps(cfg, step=30, elapsed_s=4.5, steps_timed=25, seq_len=64, timed_s=2.5)
    assert first < 250 and again > 2.5 * first
    # A budgeted run re-plans at the end of its warm-up, at a quarter and (wsd) before the decay, and completes
    # the schedule it planned.
    result = run(config(max_steps=400, max_time_s=60.0, warmup_steps=12, eval_every=100), shards, tmp_path / "out")
    err = capsys.readouterr()
    said = err.out + err.err
    assert said.count("at the speed measured after the warm-up") == 1 and said.count("at the speed measured since") == 2
    assert result.steps == result.planned_steps


def test_early_stopping_is_off_by_default_and_changes_nothing(shards, tmp_path):
    cfg = config(max_steps=8, eval_every=1, lr=3e-2, min_lr=3e-2)
    # auto: the stage turns it on for a small corpus (tests/test_small_corpus.py); `train` called directly, off
    assert cfg.early_stop_patience == "auto" and "early_stop_patience" not in cfg.model_dump()
    result = run(cfg, shards, tmp_path / "out")
    assert result.steps == 8 and not result.stopped_early
    assert result.checkpoint_dir == tmp_path / "out" / "checkpoint" and not (tmp_path / "out" / "best").exists()
    vals = [json.loads(line)["val_loss"] for line in result.metrics_file.read_text().splitlines()]
    assert result.best_val_loss == min(vals) and result.best_step == 1 + vals.index(min(vals))


def early_stop_config(**overrides) -> TrainConfig:
    """A high constant learning rate with a validation run every step: the validation loss soon stops improving
    (with this seed at step 13, after a best at step 12)."""
    return config(**{"max_steps": 40, "lr": 1e-2, "min_lr": 1e-2, "eval_every": 1, "checkpoint_every": 4,
                     "early_stop_patience": 1, **overrides})  # fmt: skip


def test_early_stopping_stops_and_reports_the_best_weights(shards, tmp_path):
    from refinery.model.evaluate import evaluate_loss

    cfg = early_stop_config()
    result = run(cfg, shards, tmp_path / "out")
    assert result.stopped_early and result.steps < cfg.max_steps
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert result.best_val_loss == min(vals.values()) and vals[result.best_step] == result.best_val_loss
    assert result.best_step == result.steps - 1  # patience 1: the first validation run without a new best stops it
    assert vals[result.steps] >= result.best_val_loss
    assert result.checkpoint_dir == tmp_path / "out" / "best"
    assert json.loads((result.checkpoint_dir / "config.json").read_text())["step"] == result.best_step
    model = load_model(result.checkpoint_dir)
    val = TokenWindows([shards[1]], SEQ)
    assert evaluate_loss(model, val, cfg.micro_batch_size, cfg.eval_batches) == pytest.approx(result.best_val_loss)
    state = load_train_state(tmp_path / "out" / "checkpoint")  # the last step's state, for a resume
    assert state["step"] == result.steps and state["stopped_early"] and state["best_step"] == result.best_step

    again = run(cfg, shards, tmp_path / "out")  # a finished run is not trained further
    assert (again.steps, again.checkpoint_dir, again.best_step) == (result.steps, result.checkpoint_dir, result.best_step)
    assert losses(again.metrics_file) == losses(result.metrics_file)


def test_early_stopping_resumes_after_sigkill_to_the_same_stop(shards, tmp_path):
    # Validation every 2 steps, patience 2: with this seed the best is at step 12 and steps 14 and 16 miss it.
    cfg = early_stop_config(lr=3e-2, min_lr=3e-2, eval_every=2, checkpoint_every=2, early_stop_patience=2)
    reference = run(cfg, shards, tmp_path / "ref")
    assert (reference.steps, reference.best_step) == (16, 12)

    out = tmp_path / "killed"
    proc = run_process(
        [sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json(), str(shards[0]), str(shards[1]), str(out), "15"],
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    state = load_train_state(out / "checkpoint")  # killed with one validation run (step 14) since the best
    assert (state["step"], state["best_step"], state["evals_since_best"]) == (14, 12, 1)

    resumed = run(cfg, shards, out)
    assert (resumed.steps, resumed.best_step, resumed.stopped_early) == (
        reference.steps, reference.best_step, True
    )  # fmt: skip
    assert resumed.best_val_loss == reference.best_val_loss
    assert losses(resumed.metrics_file) == losses(reference.metrics_file)
    for name, p in load_model(reference.checkpoint_dir).state_dict().items():
        torch.testing.assert_close(load_model(resumed.checkpoint_dir).state_dict()[name], p, rtol=0, atol=0)


def test_the_train_stage_reports_the_best_weights_and_records_the_stop(shards, tmp_path):
    from refinery.storage.outputs import Shards
    from refinery.tasks.train import _last_source, run_train

    train_path, val_path = shards
    train_tokens, val_tokens = (int(np.concatenate(map_tokens([p])).size) for p in shards)
    data = Shards(
        stage="shards", dir=train_path.parent, digest="d", documents=120, train_files=[train_path],
        val_files=[val_path], vocab_size=VOCAB, eot_id=VOCAB - 1, train_tokens=train_tokens, val_tokens=val_tokens,
        train_bytes=0, val_bytes=0,
    )  # fmt: skip
    stage_dir = tmp_path / "train"
    result = run_train(data, stage_dir, early_stop_config(), run_key="k", progress=False)
    assert result.extra["checkpoint_dir"] == "best"
    assert "best/model.safetensors" in {o.path for o in result.outputs}
    assert result.metrics["stopped_early"] == 1.0 and result.metrics["best_step"] == result.metrics["steps"] - 1
    assert result.metrics["best_val_loss"] < result.metrics["val_loss"]
    assert _last_source(stage_dir).checkpoint == stage_dir / "best"  # init_from=last continues from the best weights

    plain = run_train(data, tmp_path / "plain", config(max_steps=4), run_key="k", progress=False)
    assert plain.extra["checkpoint_dir"] == "checkpoint" and plain.metrics["stopped_early"] == 0.0
    assert plain.metrics["best_step"] == 4.0
