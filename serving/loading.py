"""From "which model" to a loaded (model, tokenizer): a checkpoint folder, an MLflow URI, or a run root.

Shared by the HTTP server, `refinery generate` and the fine-tune flow (which
needs a base checkpoint), so every command understands the same model names and
reads MLflow through the same tracking URI as the pipeline that registered them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

MLFLOW_SCHEMES = ("models:/", "runs:/")


def resolve_model(
    model: str | Path | None, root: str | Path, tracking_uri: str | None = None, dst_path: str | Path | None = None
) -> tuple[Path, Path]:
    """(checkpoint folder, tokenizer.json) for a folder, an MLflow model URI, or the run root's model.

    MLflow URIs are read from `tracking_uri` if given, else `$MLFLOW_TRACKING_URI`,
    else the root's SQLite store: the order every command resolves it in. Their
    artifacts are downloaded into `dst_path` when given (a folder the caller cleans
    up), else where MLflow puts them.
    """
    from refinery.storage.layout import RunLayout

    layout = RunLayout.at(root)
    text = str(model) if model is not None else None
    if text and text.startswith(MLFLOW_SCHEMES):
        import mlflow

        from refinery.storage.layout import fluent_tracking

        uri = layout.tracking_uri(tracking_uri)
        with fluent_tracking(uri):  # `models:/` resolves through the process-wide registry URI, whatever is passed
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=text, tracking_uri=uri, registry_uri=uri, dst_path=str(dst_path) if dst_path else None
            ))
        checkpoints = [p.parent for p in local.rglob("model.safetensors")]
        tokenizers = list(local.rglob("tokenizer.json"))
        if not checkpoints or not tokenizers:
            raise FileNotFoundError(f"{text} holds no Refinery checkpoint and tokenizer.json")
        return checkpoints[0], tokenizers[0]
    if text:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"model {path} does not exist; pass a checkpoint folder or models:/NAME/VERSION")
        for candidate in (path / "tokenizer.json", path.parent / "tokenizer.json", layout.root / "tokenizer" / "tokenizer.json"):
            if candidate.is_file():
                return path, candidate
        raise FileNotFoundError(f"no tokenizer.json in or beside {path}, nor under {layout.root}/tokenizer; pass tokenizer_file")
    from refinery.storage.manifest import read_manifest

    train = read_manifest(layout.root / "train")
    if train is None:
        raise FileNotFoundError(f"no trained model under {layout.root}; run `refinery run` first or pass a model")
    return layout.root / "train" / train.extra["checkpoint_dir"], layout.root / "tokenizer" / "tokenizer.json"


def load_for_serving(
    checkpoint_or_model_uri: str | Path | None = None,
    root: str | Path = ".refinery",
    tokenizer_file: str | Path | None = None,
    adapter: str | Path | None = None,
    merge: bool = True,
    int8: bool = False,
    device: str = "cpu",
    tracking_uri: str | None = None,
) -> tuple[torch.nn.Module, Tokenizer]:
    """(model, tokenizer) from a checkpoint folder, `models:/NAME/VERSION`, `runs:/ID/model`, or the run root.

    With `adapter` (a folder written by `train_lora`), the adapters are loaded
    and, with `merge=True`, folded into the weights. `int8=True` quantizes the
    linear layers (after merging) for a quarter of their memory.
    """
    from refinery.model.checkpoint import load_model
    from refinery.model.lora import load_lora, merge_lora
    from refinery.model.quantize import quantize_int8
    from refinery.tasks.tokenizer import load_tokenizer

    checkpoint, found_tokenizer = resolve_model(checkpoint_or_model_uri, root, tracking_uri)
    model = load_model(checkpoint, device=device)
    if adapter is not None:
        load_lora(model, Path(adapter))
        if merge or int8:
            merge_lora(model)
    if int8:
        quantize_int8(model)
    tok_path = Path(tokenizer_file) if tokenizer_file else found_tokenizer
    tokenizer, _ = load_tokenizer(tok_path)
    return model.eval(), tokenizer
