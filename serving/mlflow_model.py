"""The trained model as an MLflow pyfunc: `mlflow.pyfunc.load_model(uri).predict([...])` generates text.

The checkpoint folder (safetensors weights + JSON config) and the tokenizer
travel as artifacts; nothing is pickled but this small wrapper class.

The model loads on a CUDA GPU when one is visible, else on the CPU, like
`refinery generate --device auto`. To choose, pass
`mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})` (or `cuda`, or
`auto`), or set `REFINERY_DEVICE` in the loading process; `model_config` wins.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

DEVICE_ENV = "REFINERY_DEVICE"  # auto, cpu or cuda: where a loaded pyfunc model runs (model_config wins)


def pyfunc_device(model_config: dict[str, Any] | None) -> str:
    """The torch device for a loaded model: `model_config["device"]`, else `$REFINERY_DEVICE`, else auto."""
    from refinery.model.train import resolve_device

    name = str((model_config or {}).get("device") or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda (model_config['device'] or ${DEVICE_ENV}), not {name!r}")
    return str(resolve_device(name))


class RefineryLM(PythonModel):
    """Generates a completion for each prompt (greedy unless `temperature` is given in params)."""

    def load_context(self, context) -> None:  # noqa: ANN001
        from tokenizers import Tokenizer

        from refinery.model.checkpoint import load_model

        self.device = pyfunc_device(getattr(context, "model_config", None))
        self.model = load_model(Path(context.artifacts["checkpoint"]), device=self.device)
        self.tokenizer = Tokenizer.from_file(context.artifacts["tokenizer"])
        self.eot_id = self.tokenizer.token_to_id("<|endoftext|>")

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads type hints as a schema
        from refinery.model.generate import generate

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            prompts = [str(p) for p in model_input.iloc[:, 0].tolist()]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        ids = [self.tokenizer.encode(p).ids or [self.eot_id] for p in prompts]
        outs = generate(
            self.model,
            ids,
            max_new_tokens=int(params.get("max_new_tokens", 32)),
            temperature=float(params.get("temperature", 0.0)),
            eos_id=self.eot_id,
        )
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def log_pyfunc_model(checkpoint_dir: Path, tokenizer_file: Path) -> Any:
    """Log into the active run; returns MLflow's ModelInfo."""
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 32), ParamSpec("temperature", "double", 0.0)]),
    )
    with warnings.catch_warnings():
        # The signature is given explicitly, so MLflow's hints about inferring one are noise.
        warnings.simplefilter("ignore", UserWarning)
        return _log(checkpoint_dir, tokenizer_file, signature)


def _log(checkpoint_dir: Path, tokenizer_file: Path, signature: ModelSignature) -> Any:
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("mlflow_entry.py")),
        artifacts={"checkpoint": str(checkpoint_dir), "tokenizer": str(tokenizer_file)},
        signature=signature,
        pip_requirements=["refinery", "torch", "tokenizers", "safetensors"],
    )
