"""Model specs -> transformers models, and the parameter roles eopt needs.

Models are built from transformers configs (no weight download) with SDPA attention. With the public
vocabularies the parameter counts equal the public models' (GPT-2 124M: 124,439,808; Llama-3.2-1B:
1,235,814,400). :func:`param_hints` tells eopt what each tensor is (embedding, head, Q/K/V, MLP, norm, bias),
how GPT-2's ``Conv1D`` stores it ((in, out)) and how its fused ``c_attn`` splits into Q, K, V.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from recipes.config import ModelConfig
from recipes.errors import ConfigError

FAMILIES = ("gpt2", "llama")


def check_model_config(cfg: ModelConfig) -> None:
    """Cross-field checks that would otherwise fail deep inside transformers."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.family!r} is not one of {', '.join(FAMILIES)}")
    for key in ("n_layer", "hidden_size", "n_head", "max_position_embeddings"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"model.{key}={getattr(cfg, key)} must be > 0")
    if cfg.hidden_size % cfg.n_head:
        raise ConfigError(
            f"model.n_head={cfg.n_head} does not divide model.hidden_size={cfg.hidden_size}: "
            "pick a head count that divides the width"
        )
    if cfg.n_kv_head is not None:
        if cfg.family != "llama":
            raise ConfigError("model.n_kv_head is only for llama models: remove it or use a llama model")
        if cfg.n_kv_head <= 0 or cfg.n_head % cfg.n_kv_head:
            raise ConfigError(f"model.n_kv_head={cfg.n_kv_head} must be > 0 and divide model.n_head={cfg.n_head}")
    if cfg.vocab_size is not None and cfg.vocab_size <= 0:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} must be > 0 (or null for the tokenizer's)")
    if cfg.init_from is not None and not os.path.isdir(cfg.init_from):
        raise ConfigError(
            f"model.init_from={cfg.init_from!r} is not a directory: point it to a local Hugging Face checkpoint"
        )


def hf_config(cfg: ModelConfig, vocab_size: int, eot_token: int | None = None) -> GPT2Config | LlamaConfig:
    """The transformers config for ``cfg`` with ``vocab_size`` tokens; ``eot_token`` is its BOS/EOS id."""
    if cfg.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            bos_token_id=eot_token,
            eos_token_id=eot_token,
            n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.intermediate_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std,
            tie_word_embeddings=cfg.tie_embeddings,
            use_cache=False,
            attn_implementation="sdpa",
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=eot_token,
        eos_token_id=eot_token,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig, vocab_size: int, eot_token: int | None = None) -> nn.Module:
    """A freshly initialized model (or ``cfg.init_from``'s weights) on the current default device."""
    check_model_config(cfg)
    if cfg.init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, local_files_only=True, attn_implementation="sdpa")
        if model.config.model_type != cfg.family:
            raise ConfigError(
                f"model.init_from={cfg.init_from!r} holds a {model.config.model_type} model but model.family is "
                f"{cfg.family}: pick the matching model config"
            )
        if model.config.vocab_size < vocab_size:
            raise ConfigError(
                f"model.init_from={cfg.init_from!r} has {model.config.vocab_size} tokens but the data needs "
                f"{vocab_size}: prepare the data with that checkpoint's tokenizer"
            )
        return model
    hf_cfg = hf_config(cfg, vocab_size, eot_token)
    return GPT2LMHeadModel(hf_cfg) if cfg.family == "gpt2" else LlamaForCausalLM(hf_cfg)


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The forward's autocast context: ``amp_dtype`` (bf16 on GPU) or none (fp32)."""
    return torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None)


def cross_entropy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on ``inputs`` against ``targets``, computed in fp32."""
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def count_params(model: nn.Module) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())


def param_hints(model: nn.Module) -> dict[str, dict]:
    """eopt hints (role, storage orientation, fused-QKV split, head counts) for every named parameter."""
    config = model.config
    hints: dict[str, dict] = {}
    if config.model_type == "gpt2":
        heads = config.n_head
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                hint = {"role": "bias"}
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                hint = {"role": "norm"}
            elif name == "transformer.wte.weight":
                hint = {"role": "embedding"}
            elif name == "transformer.wpe.weight":
                hint = {"role": "pos_embedding"}
            elif name == "lm_head.weight":
                hint = {"role": "head"}
            elif name.endswith("attn.c_attn.weight"):
                width = p.shape[1] // 3
                hint = {"role": "qkv", "in_out": True, "split_qkv": (width, width, width), "n_heads": heads}
            elif name.endswith("attn.c_proj.weight"):
                hint = {"role": "attn_out", "in_out": True, "n_heads": heads}
            elif ".mlp." in name:
                hint = {"role": "mlp", "in_out": True}
            else:
                raise ValueError(f"unexpected GPT-2 parameter {name}")
            hints[name] = hint
        return hints
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads
    projection_roles = {
        "q_proj": {"role": "q", "n_heads": heads},
        "k_proj": {"role": "k", "n_heads": kv_heads},
        "v_proj": {"role": "v", "n_heads": kv_heads},
        "o_proj": {"role": "attn_out", "n_heads": heads},
    }
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if name.endswith(".bias"):
            hint = {"role": "bias"}
        elif "norm" in parts[-2]:
            hint = {"role": "norm"}
        elif name == "model.embed_tokens.weight":
            hint = {"role": "embedding"}
        elif name == "lm_head.weight":
            hint = {"role": "head"}
        elif parts[-2] in projection_roles:
            hint = dict(projection_roles[parts[-2]])
        elif parts[-3] == "mlp":
            hint = {"role": "mlp"}
        else:
            raise ValueError(f"unexpected Llama parameter {name}")
        hints[name] = hint
    return hints


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate: 6N + 12 * layers * heads * head_dim * seq_len."""
    config = model.config
    n = count_params(model)
    if config.model_type == "gpt2":
        n -= model.transformer.wpe.weight.numel()
        layers, heads, width = config.n_layer, config.n_head, config.n_embd
    else:
        layers, heads, width = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    return 6.0 * n + 12.0 * layers * heads * (width // heads) * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of known GPUs (for MFU), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    bf16_peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
    for key, peak in bf16_peaks.items():
        if key in name:
            return peak if dtype == torch.bfloat16 else peak / 2
    return None
