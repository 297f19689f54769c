"""Model zoo: public parameter counts (on the meta device), eopt hints, routing, config checks."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import eopt
from recipes.config import ModelConfig
from recipes.errors import ConfigError
from recipes.models import build_model, check_model_config, count_params, flops_per_token, param_hints

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

# Public counts: GPT-2 (tied, 50257 tokens), Llama 3.x (128256 tokens), GaLore-style Llamas (32000 tokens).
PUBLIC = {
    "gpt2_124m": (50257, 124_439_808),
    "gpt2_350m": (50257, 354_823_168),
    "gpt2_774m": (50257, 774_030_080),
    "gpt2_1558m": (50257, 1_557_611_200),
    "llama_1b": (128256, 1_235_814_400),
    "llama_3b": (128256, 3_212_749_824),
    "llama_8b": (128256, 8_030_261_248),
}


def load(name: str) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def test_every_model_config_builds_on_meta():
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert len(names) == 12
    for name in names:
        with torch.device("meta"):
            model = build_model(load(name), 8192)
        assert count_params(model) > 0


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_parameter_counts(name):
    vocab, expected = PUBLIC[name]
    with torch.device("meta"):
        model = build_model(load(name), vocab)
    assert count_params(model) == expected


def test_gpt2_hints_describe_conv1d_storage_and_fused_qkv():
    cfg = load("gpt2_tiny")
    hints = param_hints(build_model(cfg, 512))
    qkv = hints["transformer.h.0.attn.c_attn.weight"]
    assert qkv == {"role": "qkv", "in_out": True, "split_qkv": (256, 256, 256), "n_heads": 4}
    assert hints["transformer.h.0.attn.c_proj.weight"]["role"] == "attn_out"
    assert hints["transformer.h.0.mlp.c_fc.weight"] == {"role": "mlp", "in_out": True}
    assert hints["transformer.wte.weight"]["role"] == "embedding"
    assert hints["transformer.wpe.weight"]["role"] == "pos_embedding"
    assert hints["transformer.h.0.ln_1.weight"]["role"] == "norm"
    assert hints["transformer.h.0.attn.c_attn.bias"]["role"] == "bias"


def test_llama_hints_give_gqa_head_counts():
    hints = param_hints(build_model(load("llama_tiny"), 512))
    assert hints["model.layers.0.self_attn.q_proj.weight"] == {"role": "q", "n_heads": 4}
    assert hints["model.layers.0.self_attn.k_proj.weight"] == {"role": "k", "n_heads": 2}
    assert hints["model.layers.0.self_attn.v_proj.weight"] == {"role": "v", "n_heads": 2}
    assert hints["model.layers.0.mlp.down_proj.weight"]["role"] == "mlp"
    assert hints["model.embed_tokens.weight"]["role"] == "embedding"
    assert hints["lm_head.weight"]["role"] == "head"
    assert hints["model.norm.weight"]["role"] == "norm"


def test_routing_sends_hidden_matrices_to_the_optimizer_and_the_rest_to_adamw():
    model = build_model(load("llama_tiny"), 512)
    groups = eopt.build(model.named_parameters(), "adamw", hints=param_hints(model)).param_groups
    by_role = {g["role"]: g for g in groups}
    assert by_role["norm"]["weight_decay"] == 0.0  # no decay on 1-D parameters
    assert by_role["embedding"]["weight_decay"] > 0.0
    routed = {n for g in groups for n in g["param_names"]}
    assert routed == {n for n, _ in model.named_parameters()}


def test_flops_per_token_matches_nanogpt_formula():
    cfg = load("gpt2_124m")
    with torch.device("meta"):
        model = build_model(cfg, 50257)
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(model, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_head": 5}, "does not divide"),
        ({"family": "bert"}, "model.family"),
        ({"n_kv_head": 3}, "n_kv_head"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"init_from": "/nonexistent/ckpt"}, "init_from"),
    ],
)
def test_invalid_model_configs_are_rejected(override, message):
    cfg = load("llama_tiny")
    for key, value in override.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        check_model_config(cfg)
