"""The `finetune` Prefect flow: a registered base model, a user's domain folder, LoRA adapters.

    base (checkpoint folder, models:/NAME/VERSION or runs:/ID/model)
      │   its tokenizer
      ▼
    domain folder ──data_to_model (ingest, dedup, filter, tokenizer=existing, shards)──► token shards
                                                                                           │
    base weights (frozen) + LoRA on attention and MLP projections ◄──train_lora────────────┘
      │
      └─► adapters (kept) and the merged model, registered as a new MLflow model version

The domain data goes through exactly the stages of the main pipeline, in its
own run root under `<root>/finetune/<name>/`, with the tokenizer stage told to
bring the base model's tokenizer instead of training one. MLflow (the main
root's store) gets one parent run for the fine-tune with the base model URI as
an input, the domain shards as a dataset input, the adapter metrics, and a new
registered version whose tags point to both datasets: the base model's training
data digest and the domain data digest.
"""

from __future__ import annotations

import shutil
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from refinery.flows.graph import active
from refinery.flows.lineage import Lineage, flatten
from refinery.model.lora import LoRAConfig, LoRATrainConfig
from refinery.storage.layout import RunLayout
from refinery.storage.outputs import Shards


class FinetuneConfig(BaseModel):
    """Adapter shape, how to train it, and what the domain data stages are given."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="domain", min_length=1, description="folder name under <root>/finetune/")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    train: LoRATrainConfig = Field(default_factory=LoRATrainConfig)
    registered_model: str = Field(default="refinery-lm-finetuned", min_length=1)
    experiment: str = Field(default="refinery")
    data: dict[str, Any] = Field(
        default_factory=dict, description="pipeline config overrides for the data stages (ingest, dedup, filter, shards)"
    )


@flow(name="finetune", log_prints=True)
def finetune(
    base: str, sources: list[str], root: str = ".refinery", config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fine-tune `base` on `sources` with LoRA; returns a summary with the registered model URI."""
    import torch

    from refinery.flows.pipeline import data_to_model
    from refinery.model.checkpoint import load_model, save_checkpoint
    from refinery.model.lora import merge_lora, train_lora
    from refinery.serving.loading import resolve_model
    from refinery.storage.shards import TokenWindows

    logger = get_run_logger()
    cfg = FinetuneConfig.model_validate(config or {})
    layout = RunLayout.at(root)
    layout.root.mkdir(parents=True, exist_ok=True)
    work = layout.root / "finetune" / cfg.name
    # One tracking store for the base model, the domain data runs and the fine-tune run:
    # `data.tracking.mlflow_uri`, else $MLFLOW_TRACKING_URI, else the root's SQLite.
    tracking_uri = layout.tracking_uri((cfg.data.get("tracking") or {}).get("mlflow_uri"))
    checkpoint, tokenizer_file = resolve_model(base, layout.root, tracking_uri)

    # 1. The domain folder through the same data stages, with the base model's tokenizer.
    data_config = {**cfg.data, "tokenizer": {**cfg.data.get("tokenizer", {}), "existing": str(tokenizer_file)},
                   "tracking": {"mlflow_uri": tracking_uri, "experiment": cfg.experiment}}  # fmt: skip
    shards_stage = active().producing(Shards).name
    data_stages = active().upstream(shards_stage)  # every stage that leads to token shards
    data_to_model(sources=sources, root=str(work / "data"), config=data_config, stages=data_stages)
    shards_dir = work / "data" / shards_stage
    shards = Shards.read(shards_dir)
    if shards is None:
        raise RuntimeError(f"the shards stage did not complete under {shards_dir}; see the data_to_model run")

    # 2. LoRA on the frozen base.
    model = load_model(checkpoint)
    seq_len = model.cfg.seq_len
    train_files, val_files = shards.train_files, shards.val_files
    if not val_files:
        raise RuntimeError("the domain set has no validation split; add documents or raise shards.val_fraction")
    lineage = Lineage(tracking_uri, cfg.experiment, layout.mlflow_artifacts)
    run_id = lineage.start_pipeline(
        name=f"finetune {cfg.name}",
        params={"base_model": base, "sources": ",".join(sources), **flatten("", cfg.model_dump(mode="json"))},
        tags={"refinery.kind": "finetune", "refinery.base_model": base},
    )
    status = "FAILED"
    try:
        lineage.log_dataset(run_id, "base-model", [str(checkpoint)], _base_digest(lineage, base), "base_model")
        lineage.log_dataset(run_id, "domain-shards", [str(shards_dir)], shards.digest, "training")
        result = train_lora(
            model, cfg.lora, TokenWindows(train_files, seq_len, seed=cfg.train.seed), TokenWindows(val_files, seq_len),
            work / "adapter", cfg.train, on_metrics=lambda step, m: lineage.log_metrics(run_id, m, step),
            meta={"base_model": base, "base_checkpoint": str(checkpoint)},
        )  # fmt: skip
        lineage.log_metrics(run_id, {"val_loss_before": result.val_loss_before, "final_val_loss": result.val_loss,
                                     "trainable_params": result.trainable_params}, step=result.steps)  # fmt: skip
        for path in sorted((work / "adapter").iterdir()):
            lineage.client.log_artifact(run_id, str(path), artifact_path="adapter")

        # 3. The adapted model: merged into a plain checkpoint, registered as a new version.
        with torch.no_grad():
            merged = merge_lora(model)
        out = save_checkpoint(work / "merged", merged, meta={"base_model": base, "lora": cfg.lora.model_dump()})
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        name = cfg.registered_model
        _, version = lineage.log_and_register_model(
            run_id, out, out / "tokenizer.json", name,
            description=f"LoRA fine-tune of {base} on {', '.join(sources)}: validation loss "
                        f"{result.val_loss_before:.4f} -> {result.val_loss:.4f}",
        )  # fmt: skip
        for key, value in {
            "refinery.base_model": base,
            "refinery.base_input_digest": _base_tag(lineage, base, "refinery.input_digest"),
            "refinery.domain_digest": shards.digest,
        }.items():
            lineage.client.set_model_version_tag(name, version, key, value)
        status = "FINISHED"
        logger.info("fine-tuned %s: val loss %.4f -> %.4f; registered models:/%s/%s",
                    base, result.val_loss_before, result.val_loss, name, version)  # fmt: skip
        return {
            "base": base,
            "adapter_dir": str(work / "adapter"),
            "checkpoint_dir": str(out),
            "val_loss_before": result.val_loss_before,
            "val_loss": result.val_loss,
            "model": {"name": name, "version": version, "uri": f"models:/{name}/{version}"},
        }
    finally:
        lineage.end_pipeline(status)


def _base_tag(lineage: Lineage, base: str, key: str) -> str:
    """A tag of the base model version when `base` is `models:/NAME/VERSION`, else ''."""
    if not base.startswith("models:/"):
        return ""
    name, _, version = base.removeprefix("models:/").partition("/")
    try:
        return lineage.client.get_model_version(name, version).tags.get(key, "")
    except Exception:  # noqa: BLE001 - an alias or a missing version: no tag to copy
        return ""


def _base_digest(lineage: Lineage, base: str) -> str:
    return _base_tag(lineage, base, "refinery.output_digest") or base
