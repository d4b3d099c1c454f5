"""Tiny randomly-initialized causal LMs of every architecture family we support (not a test module).

Each entry builds a real ``transformers`` model from its own config class, small enough that a
forward pass takes milliseconds: hidden 64, 2 decoder layers (override with ``layers=``), 4
attention heads (2 KV heads where the family has GQA), vocabulary 384 (the tests' tiny
tokenizer: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2). Gemma 2/3 get a sliding window of 16 tokens so
windows of 32 tokens exercise both attention types; Falcon comes with rotary embeddings and with
ALiBi; the MoE families get 4 experts, 2 per token.

    model = make_tiny("qwen3", dtype=torch.bfloat16)
    save_tiny(tmp_path / "m", "gpt2", tokenizer)      # a save_pretrained directory + tokenizer
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 384
_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
_LLAMA_LIKE: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)

# name -> (config class name in transformers, config kwargs, number-of-layers field)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", {**_LLAMA_LIKE, "tie_word_embeddings": True}, "num_hidden_layers"),
    "mistral": ("MistralConfig", {**_LLAMA_LIKE, "sliding_window": None}, "num_hidden_layers"),
    "qwen2": ("Qwen2Config", dict(_LLAMA_LIKE), "num_hidden_layers"),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 16}, "num_hidden_layers"),
    "gemma2": ("Gemma2Config", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 16,
                                "query_pre_attn_scalar": 16}, "num_hidden_layers"),
    "gemma3": ("Gemma3TextConfig", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 16,
                                    "query_pre_attn_scalar": 16, "sliding_window_pattern": 2},
               "num_hidden_layers"),
    "phi3": ("Phi3Config", dict(_LLAMA_LIKE), "num_hidden_layers"),
    "phi": ("PhiConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                          "max_position_embeddings": 256, "partial_rotary_factor": 0.5}, "num_hidden_layers"),
    "olmo": ("OlmoConfig", dict(_LLAMA_LIKE), "num_hidden_layers"),
    "stablelm": ("StableLmConfig", dict(_LLAMA_LIKE), "num_hidden_layers"),
    "falcon": ("FalconConfig", {"hidden_size": 64, "num_attention_heads": 4, "alibi": False,
                                "max_position_embeddings": 256}, "num_hidden_layers"),
    "falcon_alibi": ("FalconConfig", {"hidden_size": 64, "num_attention_heads": 4, "alibi": True,
                                      "max_position_embeddings": 256}, "num_hidden_layers"),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                   "max_position_embeddings": 256}, "num_hidden_layers"),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
                          "word_embed_proj_dim": 64, "max_position_embeddings": 256}, "num_hidden_layers"),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_head": 4, "n_positions": 256, "n_inner": 128}, "n_layer"),
    "mixtral": ("MixtralConfig", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
                "num_hidden_layers"),
    "qwen2_moe": ("Qwen2MoeConfig", {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
                                     "decoder_sparse_step": 1, "mlp_only_layers": []}, "num_hidden_layers"),
}
# Families whose Minitron depth/width pruning is supported (Llama-like blocks).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
MOE = ("mixtral", "qwen2_moe")


def tiny_config(name: str, *, layers: int = 2, **overrides: Any) -> Any:
    """The config of tiny model ``name`` (see :data:`ARCHITECTURES`)."""
    import transformers

    cls_name, fields, layers_field = ARCHITECTURES[name]
    return getattr(transformers, cls_name)(**{**_COMMON, **fields, layers_field: layers, **overrides})


def make_tiny(name: str, *, dtype: torch.dtype = torch.float32, layers: int = 2, seed: int = 0,
              **overrides: Any) -> Any:
    """A randomly initialized (seeded) tiny causal LM of family ``name`` in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, layers=layers, **overrides), dtype=dtype)
    return model.eval()


def save_tiny(out: Path, name: str, tokenizer: Any, *, dtype: torch.dtype = torch.float32, layers: int = 2,
              **overrides: Any) -> Path:
    """``save_pretrained`` a tiny model of family ``name`` and ``tokenizer`` into ``out``; returns ``out``."""
    model = make_tiny(name, dtype=dtype, layers=layers, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
