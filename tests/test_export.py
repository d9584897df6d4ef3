"""Export to a Hugging Face Llama folder: transformers loads it offline and agrees with our logits."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from refinery.model.checkpoint import load_model, save_checkpoint  # noqa: E402
from refinery.model.export import export_hf_llama  # noqa: E402
from refinery.model.gpt import GPT, config_from_preset  # noqa: E402

# Tiny matmuls are fastest, and steadiest on a shared machine, on one thread.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def make_tokenizer(path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def hello(world):\n    return world * 2\n"] * 20, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, n_kv_head):
    transformers = pytest.importorskip("transformers")
    vocab = make_tokenizer(tmp_path / "tokenizer.json", 300)
    torch.manual_seed(0)
    model = GPT(config_from_preset("test", vocab, n_kv_head=n_kv_head))
    with torch.no_grad():  # non-trivial norm gains, so a mixed-up norm would show
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 1.5)
            block.mlp_norm.weight.uniform_(0.5, 1.5)
    save_checkpoint(tmp_path / "ckpt", model, meta={"step": 0})
    out = export_hf_llama(tmp_path / "ckpt", tmp_path / "tokenizer.json", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours = load_model(tmp_path / "ckpt")
    x = torch.randint(0, vocab, (2, 48))
    with torch.no_grad():
        ours_logits, _ = ours(x)
        hf_logits = hf(x).logits
    assert (ours_logits - hf_logits).abs().max().item() < 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def hello(world):")["input_ids"]
    assert tokenizer.decode(ids) == "def hello(world):"
    assert tokenizer.eos_token == "<|endoftext|>" and hf.config.eos_token_id == tokenizer.eos_token_id


def test_export_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    vocab = make_tokenizer(tmp_path / "tokenizer.json", 300)
    save_checkpoint(tmp_path / "ckpt", GPT(config_from_preset("test", vocab - 10)), meta={"step": 0})
    with pytest.raises(ValueError, match="tokenizer"):
        export_hf_llama(tmp_path / "ckpt", tmp_path / "tokenizer.json", tmp_path / "hf")
