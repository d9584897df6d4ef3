"""The train stage: token shards in, a checkpoint, metrics and a loss curve out.

The network and its loop live in `refinery.model`; this module only connects
them to the shards stage's outputs and keeps resumption honest: a checkpoint
left by a killed run is resumed only if it was made from the same inputs and
config, never from another dataset.

Continued training (`train.init_from`): instead of random weights a run can start
from `last`, the checkpoint this run root's previous train run left in the stage
folder, or from a registered model, `models:/NAME/VERSION` (or `/latest`). The
source must have the configured model shape and must have been trained with the
tokenizer that encoded the shards; both are checked before anything in the stage
folder is touched, so a refused continuation leaves the previous model in place.
The starting weights are copied to `init/` (with `init/init_from.json`, what they
are) before the folder is reset for the new run, so a run killed before its first
checkpoint resumes from them too. The optimizer and the LR schedule (warm-up, then
the decay by `max_steps`) start afresh for the new steps.

Data mixture (`train.mixture`): the training windows are drawn by weights per
document format or source-file pattern (`refinery.storage.mixture`), from the
formats and sources the shards stage records in `stats.parquet`. Whatever the
mixture, the tokens the model actually saw are counted per format and source
and written to `tokens_seen_by_format.json`, logged as `tokens_seen.format.*`
metrics and kept in the manifest.

Several processes (`train.nproc`): the stage launches `torchrun --standalone
--nproc_per_node N -m refinery.model.train` (DDP: one process per GPU, or gloo
processes on a CPU), streams rank 0's metrics back as they come, and records the
result like a one-process run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery.model.checkpoint import CONFIG, TRAIN_STATE, WEIGHTS, find_checkpoint, read_config
from refinery.model.gpt import PRESETS, GPTConfig
from refinery.model.sizing import TOKENS_PER_PARAM, resolve_preset
from refinery.model.train import AUTO, METRICS_PREFIX, TrainConfig, TrainResult, train
from refinery.storage.atomic import atomic_write_json
from refinery.storage.manifest import (
    Counts,
    StageResult,
    describe_file,
    file_sha256,
    output_digest,
    stable_hash,
)
from refinery.storage.mixture import TOKENS_SEEN_FILE, MixtureWindows
from refinery.storage.outputs import Shards
from refinery.storage.shard_stats import STATS_FILE
from refinery.storage.shards import TokenWindows

RUN_KEY = "run_key.json"
INIT_DIR = "init"  # the starting weights of a continued run, and what they are
INIT_STAGING = "init.staging"  # where they wait while the folder is reset (not a `find_checkpoint` sibling name)
INIT_RECORD = "init_from.json"
COMPLETED = "completed.json"  # written after a run completes: its weights' sha256 and output digest
TOKENIZER = "tokenizer.json"  # a copy of the tokenizer in the final checkpoint folder: the model carries it
SHAPE_KEYS = ("seq_len", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden")  # TrainConfig keys of the shape


class InitFromError(ValueError):
    """`train.init_from` cannot be honoured: says what differs and what to do."""


@dataclass
class InitSource:
    """Weights to continue from: a checkpoint folder, the tokenizer digest it was trained with, and its record."""

    checkpoint: Path
    tokenizer_digest: str | None
    record: dict[str, Any] = field(default_factory=dict)
    tokenizer_file: Path | None = None


def tokenizer_digest(path: Path) -> str:
    """sha256 of the tokenizer's canonical JSON: equal exactly when two files map text to the same ids."""
    return stable_hash(json.loads(Path(path).read_text(encoding="utf-8")))


def _same_run(stage_dir: Path, run_key: str) -> bool:
    key_file = stage_dir / RUN_KEY
    return key_file.is_file() and json.loads(key_file.read_text()).get("key") == run_key


def _reset_if_stale(stage_dir: Path, run_key: str, keep: tuple[str, ...] = ()) -> None:
    """Drop checkpoints of a different run (other inputs or config) so we never resume across datasets."""
    if _same_run(stage_dir, run_key):
        return
    for child in stage_dir.iterdir() if stage_dir.is_dir() else []:
        if child.name in keep:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / RUN_KEY, {"key": run_key})


# --------------------------------------------------------------------------- continued training


def _checkpoint_tokenizer(checkpoint: Path) -> tuple[str | None, Path | None]:
    """The digest of the tokenizer a checkpoint was trained with: from the copy it carries, else its config."""
    carried = checkpoint / TOKENIZER
    if carried.is_file():
        return tokenizer_digest(carried), carried
    return read_config(checkpoint).get("tokenizer_sha256"), None


def _last_source(stage_dir: Path) -> InitSource | None:
    """The newest weights in the train folder: the previous run's checkpoint, else the weights it started from.

    The checkpoint is the one the previous run reported (`best/` when early stopping kept earlier weights),
    else its last `checkpoint/`."""
    completed = stage_dir / COMPLETED
    reported = json.loads(completed.read_text()).get("checkpoint_dir") if completed.is_file() else None
    checkpoint = (find_checkpoint(stage_dir / reported) if reported else None) or find_checkpoint(
        stage_dir / "checkpoint"
    )
    if checkpoint is not None:
        weights = file_sha256(checkpoint / WEIGHTS)
        record: dict[str, Any] = {
            "kind": "last", "path": str(checkpoint.relative_to(stage_dir)),
            "step": read_config(checkpoint).get("step"), "weights_sha256": weights,
        }  # fmt: skip
        if completed.is_file():
            done = json.loads(completed.read_text())
            if done.get("weights_sha256") == weights:
                record.update(complete=True, output_digest=done.get("output_digest", ""))
        digest, carried = _checkpoint_tokenizer(checkpoint)
        return InitSource(checkpoint, digest, record, carried)
    init = find_checkpoint(stage_dir / INIT_DIR)
    if init is not None:  # the previous run was reset and killed before its first checkpoint: its parent
        record = json.loads((init / INIT_RECORD).read_text()) if (init / INIT_RECORD).is_file() else {"kind": "last"}
        digest, carried = _checkpoint_tokenizer(init)
        return InitSource(init, digest, record, carried)
    return None


def _model_version(uri: str, tracking_uri: str) -> tuple[str, str, dict[str, str]]:
    """(name, version, tags) of `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@ALIAS`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rest = uri.removeprefix("models:/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = rest.partition("/")
            if version in ("", "latest"):
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise InitFromError(f"train.init_from={uri}: no version of model {name!r} in {tracking_uri}")
                version = str(max(int(v.version) for v in versions))
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise InitFromError(
            f"train.init_from={uri}: not found in the MLflow registry at {tracking_uri} ({exc.message}); "
            "check the name and version (models:/NAME/VERSION), or set train.init_from=scratch"
        ) from exc
    return mv.name, str(mv.version), dict(mv.tags)


def _registered_source(uri: str, root: Path, tracking_uri: str, download_to: Path) -> InitSource:
    """A registered model version's checkpoint and tokenizer, downloaded into `download_to`."""
    from refinery.serving.loading import resolve_model

    name, version, tags = _model_version(uri, tracking_uri)
    checkpoint, tokenizer = resolve_model(f"models:/{name}/{version}", root, tracking_uri, dst_path=download_to)
    record = {
        "kind": "model", "uri": uri, "name": name, "version": version,
        "output_digest": tags.get("refinery.output_digest", ""),
    }  # fmt: skip
    return InitSource(checkpoint, tokenizer_digest(tokenizer), record, tokenizer)


def _check_source(source: InitSource, init_from: str, model_cfg: GPTConfig | None, tokenizer_file: Path) -> None:
    """Refuse a source trained with another tokenizer or of another model shape, saying what to do."""
    what = f"the model {source.record['uri']}" if source.record.get("kind") == "model" else f"the checkpoint {source.checkpoint}"
    current = tokenizer_digest(tokenizer_file)
    if source.tokenizer_digest is None:
        raise InitFromError(
            f"train.init_from={init_from}: {what} does not record the tokenizer it was trained with (it predates "
            "continued training), so there is no telling whether its weights fit the token ids of these shards. "
            "Train once with train.init_from=scratch; later runs can continue from that model"
        )
    if source.tokenizer_digest != current:
        carried = f" (it carries it: {source.tokenizer_file})" if source.tokenizer_file else ""
        raise InitFromError(
            f"train.init_from={init_from}: the tokenizer changed since {what} was trained (tokenizer "
            f"{source.tokenizer_digest[:12]} then, {current[:12]} now, {tokenizer_file}), so its weights mean nothing "
            "for the new token ids. The tokenizer stage trains a new tokenizer whenever the curated documents change; "
            f"pin it with tokenizer.existing set to a copy of the source's tokenizer.json{carried}, kept outside the "
            "run root's stage folders, so that later runs encode with it and can continue; or set train.init_from=scratch"
        )
    if model_cfg is None:  # `preset: auto` continues in the source's shape
        return
    saved = GPTConfig(**read_config(source.checkpoint)["model"])
    differs = {
        k: (getattr(saved, k), getattr(model_cfg, k))
        for k in GPTConfig.model_fields
        if k != "dropout" and getattr(saved, k) != getattr(model_cfg, k)
    }
    if differs:
        listed = ", ".join(f"{k} {a} in the source, {b} configured" for k, (a, b) in differs.items())
        settable = {k: a for k, (a, _) in differs.items() if k in SHAPE_KEYS}
        fix = (f"set {', '.join(f'train.{k}={v}' for k, v in settable.items())} (the source's shape)"
               if settable and len(settable) == len(differs) else "train a model of this shape")  # fmt: skip
        raise InitFromError(
            f"train.init_from={init_from}: {what} has another model shape than this config trains ({listed}); "
            f"continuing needs the same shape: {fix}, or set train.init_from=scratch"
        )


def _stage_source(source: InitSource, stage_dir: Path) -> None:
    """Put the source's weights, config, tokenizer and record where the folder's reset leaves them."""
    staging = stage_dir / INIT_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    if source.checkpoint.parent == stage_dir:  # `last`: the folder is about to be reset anyway, so move it
        source.checkpoint.rename(staging)
        (staging / TRAIN_STATE).unlink(missing_ok=True)  # the optimizer state is not carried over
    else:
        staging.mkdir(parents=True)
        for name in (WEIGHTS, CONFIG):
            shutil.copyfile(source.checkpoint / name, staging / name)
    if source.tokenizer_file is not None and not (staging / TOKENIZER).is_file():
        shutil.copyfile(source.tokenizer_file, staging / TOKENIZER)
    atomic_write_json(staging / INIT_RECORD, source.record)


def _prepare_init(
    cfg: TrainConfig, stage_dir: Path, model_cfg: GPTConfig | None, tokenizer_file: Path | None, tracking_uri: str | None
) -> dict[str, Any]:
    """Resolve, check and stage `cfg.init_from` for a new run; returns what the manifest records."""
    if tokenizer_file is None:
        raise InitFromError(
            f"train.init_from={cfg.init_from} needs the tokenizer that encoded the shards, to check it is the "
            "source model's; pass tokenizer_file"
        )
    with tempfile.TemporaryDirectory() as download:
        if cfg.init_from == "last":
            source = _last_source(stage_dir)
            if source is None:
                warnings.warn(
                    f"train.init_from=last: no previous checkpoint in {stage_dir}; training from scratch",
                    stacklevel=3,
                )
                return {"kind": "scratch", "requested": "last", "reason": "no previous checkpoint"}
        else:
            from refinery.storage.layout import RunLayout

            uri = RunLayout.at(stage_dir.parent).tracking_uri(tracking_uri)
            source = _registered_source(cfg.init_from, stage_dir.parent, uri, Path(download))
        _check_source(source, cfg.init_from, model_cfg, tokenizer_file)
        _stage_source(source, stage_dir)
    return source.record


# --------------------------------------------------------------------------- the stage

SIZING_FILE = "sizing.json"  # what `preset: auto` chose for this run, so that a resumed run trains the same shape


def _resolve_preset(
    cfg: TrainConfig, vocab_size: int, train_tokens: int, stage_dir: Path, init_weights: Path | None
) -> tuple[TrainConfig, dict[str, Any]]:
    """`cfg` with `preset: auto` resolved, and what the choice was ({} for a pinned preset).

    Continued training keeps the shape of the weights it starts from. A run that resumes
    reads back its own choice (the folder is reset when the run changes), since a second
    measurement could choose otherwise and orphan the checkpoint.
    """
    if cfg.preset != AUTO:
        return cfg, {}
    if init_weights is not None:
        saved = read_config(init_weights)
        shape = {k: saved["model"][k] for k in SHAPE_KEYS}
        preset = saved.get("train_config", {}).get("preset")
        update = {"preset": preset if preset in PRESETS else "cpu-small", **shape}
        return cfg.model_copy(update=update), {"describe": "preset auto: the shape of the weights it continues from",
                                               "update": update}  # fmt: skip
    path = stage_dir / SIZING_FILE
    if path.is_file():
        record = json.loads(path.read_text())
        return cfg.model_copy(update=record["update"]), record
    resolved, choice = resolve_preset(cfg, vocab_size, train_tokens, world_size=cfg.nproc)
    assert choice is not None
    update = {"preset": resolved.preset, "max_time_s": resolved.max_time_s}
    record = {**choice.as_dict(), "describe": choice.describe(), "update": update}
    atomic_write_json(path, record)
    return resolved, record



# Below this many tokens per parameter the run warns before training. A heuristic, far under the
# compute-optimal ratio on purpose: the bundled sample (about 0.2) still trains a model 15% below the
# unigram baseline. What decides is eval's baseline check (`eval.min_gain_over_unigram`).
SMALL_CORPUS_TOKENS_PER_PARAM = 0.05
SMALL_CORPUS_TOKENS = 100_000  # and below this many training tokens whatever the model: too few to learn a language
SMALL_CORPUS_PATIENCE = 2  # `early_stop_patience: auto` on a small corpus: validation runs without a new best


@dataclass(frozen=True)
class TrainingPlan:
    """What training is about to do, stated before it starts: data, model size, steps, epochs."""

    train_tokens: int
    preset: str
    num_params: int
    max_steps: int
    tokens_per_step: int
    max_time_s: float | None

    @property
    def tokens_per_param(self) -> float:
        return self.train_tokens / max(1, self.num_params)

    @property
    def epochs(self) -> float:
        return self.max_steps * self.tokens_per_step / max(1, self.train_tokens)

    @property
    def small_corpus(self) -> str | None:
        """A warning when the corpus is far too small for the model (or for any language model), else None."""
        if self.tokens_per_param >= SMALL_CORPUS_TOKENS_PER_PARAM and self.train_tokens >= SMALL_CORPUS_TOKENS:
            return None
        return (
            f"the corpus is small for this model: {self.train_tokens:,} training tokens for {self.num_params:,} "
            f"parameters ({self.tokens_per_param:.2f} tokens per parameter; compute-optimal training wants about "
            f"{TOKENS_PER_PARAM:.0f}), so the model will mostly memorise it; expect a validation loss near the "
            "unigram baseline. Training is evaluated every epoch and stops early once validation loss stops "
            "improving, and a model not clearly better than the baseline is not registered. Add documents, or pin a "
            "smaller train.preset"
        )

    def describe(self) -> str:
        steps = (f"at most {self.max_steps} steps x {self.tokens_per_step:,} tokens ({self.epochs:.1f} epochs), as "
                 f"many as the time budget of {self.max_time_s:.0f} s fits: measured after the first steps"
                 if self.max_time_s else
                 f"{self.max_steps} steps x {self.tokens_per_step:,} tokens = {self.epochs:.1f} epochs")  # fmt: skip
        return (
            f"train: plan: {self.train_tokens:,} training tokens after curation; preset {self.preset}, "
            f"{self.num_params:,} parameters ({self.tokens_per_param:.2f} tokens per parameter, about "
            f"{TOKENS_PER_PARAM:.0f} is compute-optimal); {steps}"
        )


def _early_stopping_for(cfg: TrainConfig, plan: TrainingPlan) -> TrainConfig:
    """`early_stop_patience: auto` resolved: on a small corpus, stop after `SMALL_CORPUS_PATIENCE` validation
    runs without a new best, with a validation run at least every epoch; else no early stopping."""
    if cfg.early_stop_patience != AUTO:
        return cfg
    if not plan.small_corpus:
        return cfg.model_copy(update={"early_stop_patience": None})
    steps_per_epoch = max(1, plan.train_tokens // cfg.tokens_per_step)
    every = max(5, min(cfg.eval_every, steps_per_epoch))
    return cfg.model_copy(update={"early_stop_patience": SMALL_CORPUS_PATIENCE, "eval_every": every})


def training_plan(cfg: TrainConfig, model_cfg: Any, train_tokens: int) -> TrainingPlan:
    """The plan for `cfg` on `train_tokens`; the parameter count comes from a model built on the meta device."""
    import torch

    from refinery.model.gpt import GPT

    with torch.device("meta"):
        num_params = GPT(model_cfg).num_params()
    return TrainingPlan(train_tokens, cfg.preset, num_params, cfg.max_steps, cfg.tokens_per_step, cfg.max_time_s)


def run_train(
    shards: Shards,
    stage_dir: Path,
    cfg: TrainConfig,
    run_key: str,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    tokenizer_file: Path | None = None,
    tracking_uri: str | None = None,
    input_digest: str | None = None,
    code_version: str | None = None,
) -> StageResult:
    """Train on the shards in `stage_dir`, resuming a killed run of the same `run_key`.

    `tokenizer_file` is the tokenizer that encoded the shards: its digest is saved
    with the checkpoints, a copy goes into the final checkpoint, and continued
    training checks it against the source's. `tracking_uri` resolves
    `init_from=models:/...` (else `$MLFLOW_TRACKING_URI`, else the run root's store).
    `input_digest` and `code_version` (the stage's) let the run record its output digest, which a
    later `init_from=last` run names as its parent.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not shards.val_files or not shards.train_files:
        raise ValueError(
            f"the shards hold {shards.train_tokens} training and {shards.val_tokens} "
            "validation tokens; both splits need documents: add documents or raise shards.val_fraction"
        )
    vocab_size = shards.vocab_size
    model_cfg = cfg.model_config_for(vocab_size) if cfg.preset != AUTO else None
    fresh = not _same_run(stage_dir, run_key)
    staging, init_dir = stage_dir / INIT_STAGING, stage_dir / INIT_DIR
    if fresh or init_dir.is_dir():  # a leftover of another run, or of this one whose init/ is in place
        shutil.rmtree(staging, ignore_errors=True)
    record: dict[str, Any] = {"kind": "scratch"}
    if fresh and cfg.init_from != "scratch":
        record = _prepare_init(cfg, stage_dir, model_cfg, tokenizer_file, tracking_uri)
    _reset_if_stale(stage_dir, run_key, keep=(INIT_STAGING,))
    if staging.is_dir():
        staging.rename(init_dir)
    if (init_dir / INIT_RECORD).is_file():  # this run (or the killed run it resumes) continues from these weights
        record = json.loads((init_dir / INIT_RECORD).read_text())
    init_weights = init_dir if find_checkpoint(init_dir) is not None else None
    meta = {"tokenizer_sha256": tokenizer_digest(tokenizer_file)} if tokenizer_file is not None else {}
    cfg, sizing = _resolve_preset(cfg, vocab_size, shards.train_tokens, stage_dir, init_weights)
    model_cfg = cfg.model_config_for(vocab_size)

    plan = training_plan(cfg, model_cfg, shards.train_tokens)
    if sizing:
        print(f"train: {sizing.get('describe', '')}", file=sys.stderr, flush=True)
    print(plan.describe(), file=sys.stderr, flush=True)
    if plan.small_corpus:
        warnings.warn(plan.small_corpus, stacklevel=2)
    cfg = _early_stopping_for(cfg, plan)

    seq_len = model_cfg.seq_len
    stats_file = shards.dir / STATS_FILE
    meta = {**meta, "init_from": record}
    if cfg.nproc > 1:
        result = train_torchrun(
            cfg, shards.train_files, shards.val_files, vocab_size, stage_dir, stats_file=stats_file,
            on_metrics=on_metrics, progress=progress, init_weights=init_weights, meta=meta,
        )  # fmt: skip
    else:
        train_data = MixtureWindows(
            shards.train_files, seq_len=seq_len, seed=cfg.seed, mixture=cfg.mixture, stats_file=stats_file
        )
        val_data = TokenWindows(shards.val_files, seq_len=seq_len, seed=cfg.seed)
        result = train(
            cfg,
            vocab_size=vocab_size,
            train_data=train_data,
            val_data=val_data,
            out_dir=stage_dir,
            on_metrics=on_metrics,
            progress=progress,
            init_weights=init_weights,
            meta=meta,
        )
    checkpoint_dir = Path(result.checkpoint_dir)
    if tokenizer_file is not None and checkpoint_dir.is_dir():
        shutil.copyfile(tokenizer_file, checkpoint_dir / TOKENIZER)
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file())
    files += [Path(result.metrics_file), Path(result.loss_curve), stage_dir / TOKENS_SEEN_FILE]
    outputs = [describe_file(stage_dir, p) for p in files if p.is_file()]
    metrics = {
        "steps": float(result.steps),
        "planned_steps": float(result.planned_steps),
        "plan_train_tokens": float(plan.train_tokens),
        "plan_tokens_per_param": plan.tokens_per_param,
        "plan_epochs": plan.epochs,
        "epochs_seen": result.tokens_seen / max(1, plan.train_tokens),
        "tokens_seen": float(result.tokens_seen),
        "train_loss": float(result.train_loss),
        "val_loss": float(result.val_loss),
        "tokens_per_s": float(result.tokens_per_s),
        "mfu": float(result.mfu),
        "num_params": float(result.num_params),
        "stopped_early": float(result.stopped_early),
    }
    if result.best_val_loss == result.best_val_loss:  # not NaN: a run resumed from a state that predates it
        metrics.update(best_val_loss=float(result.best_val_loss), best_step=float(result.best_step))
    metrics.update({f"precision.{k}_ms": 1e3 * v for k, v in result.precision_timings_s.items()})
    seen = result.tokens_seen_by
    metrics.update({f"tokens_seen.format.{k}": float(v) for k, v in seen.get("by_format", {}).items()})
    extra = {
        "checkpoint_dir": str(checkpoint_dir.relative_to(stage_dir)),
        "loss_curve": str(Path(result.loss_curve).relative_to(stage_dir)),
        "metrics_file": str(Path(result.metrics_file).relative_to(stage_dir)),
        "init_from": record,
        "precision": {"precision": result.precision, "source": result.precision_source,
                      "timings_s": result.precision_timings_s},
        "tokens_seen_by_format": seen.get("by_format", {}),
        "mixture": cfg.mixture,
        "nproc": cfg.nproc,
        "small_corpus": plan.small_corpus,
        "early_stop_patience": cfg.early_stop_patience,
    }  # fmt: skip
    if seen:
        print(f"train: tokens seen by format: {json.dumps(seen.get('by_format', {}))}", file=sys.stderr, flush=True)
    counts = Counts(**{"in": shards.documents, "kept": shards.documents})
    weights = next((o.sha256 for o in outputs if o.path == str(checkpoint_dir.relative_to(stage_dir) / WEIGHTS)), "")
    done = {"key": run_key, "weights_sha256": weights, "checkpoint_dir": extra["checkpoint_dir"]}
    if input_digest is not None and code_version is not None:
        done["output_digest"] = output_digest(outputs, counts, input_digest, code_version)
    atomic_write_json(stage_dir / COMPLETED, done)
    return StageResult(outputs=outputs, counts=counts, metrics=metrics, extra=extra)


# --------------------------------------------------------------------------- several processes


def check_nproc(cfg: TrainConfig) -> str:
    """The device family N processes run on, or a ValueError that says what fits this machine."""
    import torch

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        gpus = torch.cuda.device_count()
        if cfg.nproc > gpus:
            raise ValueError(
                f"train.nproc={cfg.nproc} needs {cfg.nproc} GPUs, and {gpus} are visible; set train.nproc<={gpus}, "
                "or train.device=cpu for gloo processes on the CPU"
            )
        return "cuda"
    return "cpu"


def train_torchrun(
    cfg: TrainConfig,
    train_files: list[Path],
    val_files: list[Path],
    vocab_size: int,
    out_dir: Path,
    stats_file: Path | None = None,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    init_weights: Path | None = None,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train in `cfg.nproc` processes under `torchrun --standalone` and return rank 0's result.

    Rank 0's per-step metrics come back on its stdout (`--report-metrics`) and reach
    `on_metrics` as they are logged, as in a one-process run. On a CPU each process gets
    an equal share of the cores (`OMP_NUM_THREADS`, unless set).
    """
    family = check_nproc(cfg)
    env = dict(os.environ)
    if family == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    with tempfile.TemporaryDirectory(prefix="refinery-torchrun-") as tmp:
        config_file = Path(tmp) / "train.json"
        config_file.write_text(cfg.model_dump_json(), encoding="utf-8")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
            "-m", "refinery.model.train", "--train", *map(str, train_files), "--val", *map(str, val_files),
            "--vocab-size", str(vocab_size), "--out", str(out_dir), "--config", str(config_file),
            "--meta", json.dumps(meta or {}), "--report-metrics",
        ]  # fmt: skip
        if stats_file is not None:
            cmd += ["--stats", str(stats_file)]
        if init_weights is not None:
            cmd += ["--init-weights", str(init_weights)]
        if not progress:
            cmd.append("--no-progress")
        result: TrainResult | None = None
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(METRICS_PREFIX):
                    step, _, payload = line[len(METRICS_PREFIX):].partition(" ")
                    if on_metrics is not None:
                        on_metrics(int(step), json.loads(payload))
                elif line.startswith("{") and '"checkpoint_dir"' in line:
                    result = TrainResult.model_validate_json(line)
                else:
                    sys.stdout.write(line)
            code = proc.wait()
    if code != 0 or result is None:
        raise RuntimeError(
            f"train.nproc={cfg.nproc}: torchrun exited with status {code}"
            + ("" if code else " without a result") + "; the processes' errors are above"
        )
    return result
