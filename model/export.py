"""Export a checkpoint as a Hugging Face Llama folder that `transformers` loads offline.

Our network is the Llama architecture with two matrices fused for speed, so the
export only splits them (`qkv` -> q/k/v_proj, `gate_up` -> gate/up_proj) and
renames. RoPE uses the same `rotate_half` layout, so no permutation is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from refinery.model.checkpoint import load_model
from refinery.model.gpt import GPT
from refinery.storage.atomic import atomic_path, atomic_write_json


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under `LlamaForCausalLM` names (lm_head omitted when tied, as transformers saves it)."""
    cfg = model.cfg
    q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split((q_size, kv_size, kv_size), dim=0)
        gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
        out |= {
            pre + "input_layernorm.weight": block.attn_norm.weight,
            pre + "self_attn.q_proj.weight": q,
            pre + "self_attn.k_proj.weight": k,
            pre + "self_attn.v_proj.weight": v,
            pre + "self_attn.o_proj.weight": block.attn.proj.weight,
            pre + "post_attention_layernorm.weight": block.mlp_norm.weight,
            pre + "mlp.gate_proj.weight": gate,
            pre + "mlp.up_proj.weight": up,
            pre + "mlp.down_proj.weight": block.mlp.down.weight,
        }
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def _eos_token(tokenizer_file: Path) -> tuple[str | None, int | None]:
    """The end-of-text token of a tokenizer.json: a special added token named like one."""
    data = json.loads(Path(tokenizer_file).read_text())
    special = [t for t in data.get("added_tokens", []) if t.get("special")]
    for tok in special:
        if any(key in tok["content"].lower() for key in ("endoftext", "eos", "</s>")):
            return tok["content"], tok["id"]
    return (special[0]["content"], special[0]["id"]) if special else (None, None)


def llama_config(model: GPT, eos: str | None, eos_id: int | None) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }


def export_hf_llama(checkpoint_dir: Path, tokenizer_file: Path, out_dir: Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files to `out_dir`; returns it.

    Load it with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)`; nothing is downloaded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(Path(checkpoint_dir), device="cpu")
    eos, eos_id = _eos_token(tokenizer_file)
    tokenizer_vocab = len(json.loads(Path(tokenizer_file).read_text())["model"]["vocab"])
    if tokenizer_vocab > model.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens but the model only {model.cfg.vocab_size}; "
            "export with the tokenizer the model was trained with"
        )
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(llama_state_dict(model), str(tmp), metadata={"format": "pt"})
    atomic_write_json(out_dir / "config.json", llama_config(model, eos, eos_id))
    atomic_write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": eos_id, "eos_token_id": eos_id, "max_length": model.cfg.seq_len},
    )
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        shutil.copyfile(tokenizer_file, tmp)
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.cfg.seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if eos is not None:
        tokenizer_config |= {"eos_token": eos, "bos_token": eos, "unk_token": eos}
    atomic_write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    return out_dir
