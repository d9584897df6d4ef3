"""The MLflow pyfunc model runs where it is told: `auto` (CUDA when visible), or forced to the CPU."""

from __future__ import annotations

import pytest
import torch
from tokenizers import pre_tokenizers, trainers

from refinery.model.checkpoint import save_checkpoint
from refinery.model.gpt import GPT, config_from_preset
from refinery.serving.mlflow_model import DEVICE_ENV, pyfunc_device
from refinery.tasks.tokenizer import EOT, new_byte_level_bpe

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 20


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory) -> str:
    """A tiny model logged as a pyfunc into a private MLflow store; its `runs:/` URI."""
    import mlflow

    from refinery.serving.mlflow_model import log_pyfunc_model
    from refinery.storage.layout import fluent_tracking

    tmp = tmp_path_factory.mktemp("pyfunc")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp / "checkpoint", GPT(config_from_preset("test", tok.get_vocab_size(), seq_len=64)))
    tok.save(str(tmp / "tokenizer.json"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with fluent_tracking(uri):
        experiment = mlflow.create_experiment("pyfunc", artifact_location=(tmp / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            log_pyfunc_model(checkpoint, tmp / "tokenizer.json")
    return uri, f"runs:/{run.info.run_id}/model"


def load(logged_model, **kwargs):
    import mlflow

    from refinery.storage.layout import fluent_tracking

    uri, model_uri = logged_model
    with fluent_tracking(uri):
        return mlflow.pyfunc.load_model(model_uri, **kwargs)


def test_device_resolution_prefers_model_config_then_the_environment(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert pyfunc_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pyfunc_device({"device": "cpu"}) == "cpu"
    assert pyfunc_device({"device": "auto"}) == pyfunc_device(None)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert pyfunc_device(None) == "cpu"
    assert pyfunc_device({}) == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        pyfunc_device({"device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pyfunc_device({"device": "cuda"})  # model_config wins over the environment's cpu


@pytest.mark.parametrize("model_config", [None, {"device": "cpu"}])
def test_the_pyfunc_model_generates_on_the_device_it_resolves(logged_model, model_config, monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    model = load(logged_model, model_config=model_config)
    wrapped = model.unwrap_python_model()
    expected = "cpu" if (model_config or {}).get("device") == "cpu" or not torch.cuda.is_available() else "cuda"
    assert next(wrapped.model.parameters()).device.type == expected
    out = model.predict(["def "], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)
