"""eopt.AdamMini against the authors' adam_mini.Adam_mini (1.1.1) and the structural partition."""

from __future__ import annotations

import copy

import pytest
import torch

import eopt
from eopt.adam_mini import AdamMini, block_layout

transformers = pytest.importorskip("transformers")


def _tiny_llama(tie: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


def _tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).float()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _max_rel_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    errs = [
        ((pa - pb).norm() / pb.norm().clamp_min(1e-30)).item()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    ]
    return max(errs)


@pytest.mark.parametrize(("foreach", "tie"), [(False, False), (True, True)])
def test_standalone_matches_authors_on_gqa_llama(foreach: bool, tie: bool) -> None:
    adam_mini = pytest.importorskip("adam_mini")
    ours, ref = _tiny_llama(tie), _tiny_llama(tie)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    heads = dict(dim=32, n_heads=4, n_kv_heads=2)
    opt = AdamMini(ours.named_parameters(), **kw, **heads, foreach=foreach)
    oracle = adam_mini.Adam_mini(ref.named_parameters(), **kw, **heads, verbose=False)
    _train(ours, opt, 20)
    _train(ref, oracle, 20)
    assert _max_rel_err(ours, ref) <= 1e-6
    # One second moment per block: K has n_kv_heads blocks, Q n_heads, MLP rows, norms one.
    state = {name: opt.state[p]["exp_avg_sq"].numel() for name, p in ours.named_parameters()}
    assert state["model.layers.0.self_attn.q_proj.weight"] == 4
    assert state["model.layers.0.self_attn.k_proj.weight"] == 2
    assert state["model.layers.0.self_attn.v_proj.weight"] == 16
    assert state["model.layers.0.mlp.up_proj.weight"] == 48
    assert state["model.layers.0.input_layernorm.weight"] == 1
    assert state["model.embed_tokens.weight"] == 64


def _roles_llama(model: torch.nn.Module) -> dict[str, dict]:
    """Structural hints, as the recipe gives them (head counts of the tensor, no names read by eopt)."""
    hints = {}
    for name, _ in model.named_parameters():
        if "norm" in name:
            hints[name] = {"role": "norm"}
        elif "embed_tokens" in name:
            hints[name] = {"role": "embedding"}
        elif "lm_head" in name:
            hints[name] = {"role": "head"}
        elif "q_proj" in name:
            hints[name] = {"role": "q", "n_heads": 4}
        elif "k_proj" in name:
            hints[name] = {"role": "k", "n_heads": 2}
        elif "v_proj" in name:
            hints[name] = {"role": "v", "n_heads": 2}
        elif "o_proj" in name:
            hints[name] = {"role": "attn_out", "n_heads": 4}
        else:
            hints[name] = {"role": "mlp"}
    return hints


def test_build_with_structural_hints_matches_authors_on_llama() -> None:
    adam_mini = pytest.importorskip("adam_mini")
    ours, ref = _tiny_llama(), _tiny_llama()
    opt = eopt.build(
        ours.named_parameters(),
        "adam_mini",
        hints=_roles_llama(ours),
        decay_1d=False,
        lr=3e-3,
        betas=(0.9, 0.95),
        weight_decay=0.1,
    )
    assert all(g["algorithm"] == "adam_mini" for g in opt.param_groups)  # routing "all", as the authors do
    oracle = adam_mini.Adam_mini(
        ref.named_parameters(),
        lr=3e-3,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        dim=32,
        n_heads=4,
        n_kv_heads=2,
        verbose=False,
    )
    _train(ours, opt, 20)
    _train(ref, oracle, 20)
    assert _max_rel_err(ours, ref) <= 1e-6


def _gpt2_hints(model: torch.nn.Module) -> dict[str, dict]:
    hints = {}
    for name, _ in model.named_parameters():
        if name.endswith(".bias"):
            hints[name] = {"role": "bias"}
        elif ".ln_" in name:
            hints[name] = {"role": "norm"}
        elif name == "transformer.wte.weight":
            hints[name] = {"role": "embedding"}
        elif name == "transformer.wpe.weight":
            hints[name] = {"role": "pos_embedding"}
        elif "c_attn" in name:
            hints[name] = {"role": "qkv", "in_out": True, "split_qkv": (32, 32, 32), "n_heads": 4}
        elif "attn.c_proj" in name:
            hints[name] = {"role": "attn_out", "in_out": True, "n_heads": 4}
        else:
            hints[name] = {"role": "mlp", "in_out": True}
    return hints


def _reference_gpt2_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: int,
    hint: dict,
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    wd: float,
) -> None:
    """From the formula: explicit (out, in) transpose and explicit block index per row."""
    w = p.data.T if hint.get("in_out") else p.data  # (out, in) views share storage with p
    gm = g.T if hint.get("in_out") else g
    mm = m.T if hint.get("in_out") else m
    role = hint["role"]
    if role == "bias":
        block_of = torch.arange(p.numel()).view(p.shape)
    elif role == "qkv":
        rows = torch.arange(96)
        block_of = torch.where(rows < 32, rows // 8, torch.where(rows < 64, 4 + (rows - 32) // 8, 8 + rows - 64))
        block_of = block_of[:, None].expand_as(gm)
    elif role in ("attn_out", "mlp", "embedding"):
        block_of = torch.arange(gm.shape[0])[:, None].expand_as(gm)
    else:
        block_of = torch.zeros_like(gm, dtype=torch.long)
    n = int(block_of.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, block_of.flatten(), gm.double().flatten() ** 2)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, block_of.flatten(), torch.ones(gm.numel()).double())
    v.mul_(b2).add_((sums / counts).float() * (1 - b2))
    w.mul_(1 - lr * wd)
    mm.mul_(b1).add_(gm * (1 - b1))
    denom = (v.sqrt() / (1 - b2**t) ** 0.5 + eps)[block_of]
    w.sub_(lr / (1 - b1**t) * mm / denom)


def test_gpt2_fused_qkv_gets_per_head_blocks_and_matches_formula() -> None:
    model = _tiny_gpt2()
    hints = _gpt2_hints(model)
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.95, 1e-8, 0.1
    opt = eopt.build(model.named_parameters(), "adam_mini", hints=hints, lr=lr, betas=(b1, b2), weight_decay=wd)
    c_attn = model.transformer.h[0].attn.c_attn.weight
    layout = block_layout({"params": [], **hints["transformer.h.0.attn.c_attn.weight"]}, c_attn)
    # Q and K of c_attn: n_heads blocks each (head_dim rows of (out, in) = columns of the stored (in, out)).
    assert layout.segments == ((0, 32, 4), (32, 64, 4), (64, 96, 32)) and layout.in_out
    assert opt.state[c_attn]["exp_avg_sq"].numel() == 4 + 4 + 32
    named = dict(model.named_parameters())
    ref = {n: p.detach().clone() for n, p in named.items()}
    ref_m = {n: torch.zeros_like(p) for n, p in ref.items()}
    ref_v = {n: torch.zeros_like(opt.state[named[n]]["exp_avg_sq"]) for n in ref}
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 6):
        for n, p in named.items():
            p.grad = torch.randn(p.shape, generator=gen) * torch.rand((), generator=gen)
            decay = wd if p.ndim >= 2 else 0.0
            _reference_gpt2_step(ref[n], p.grad, ref_m[n], ref_v[n], t, hints[n], lr, b1, b2, eps, decay)
        opt.step()
    for n, p in named.items():
        assert (p - ref[n]).norm() <= 1e-6 * ref[n].norm(), n


def test_state_memory_about_half_of_adamw() -> None:
    """On the benchmark-sized models (width 256, vocab 4096): <= 0.51x AdamW's state."""
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=640,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=4096, n_positions=256, n_embd=256, n_layer=4, n_head=4)
    )
    for model, hints in ((llama, _roles_llama(llama)), (gpt2, _gpt2_hints(gpt2))):
        for h in hints.values():  # width 256 instead of the tiny models' 32
            if h["role"] == "qkv":
                h["split_qkv"] = (256, 256, 256)
            if h["role"] in ("q", "k"):
                h["n_heads"] = 4
        named = list(model.named_parameters())
        opt = eopt.build(named, "adam_mini", hints=hints)
        adamw = eopt.build(named, "adamw")
        assert eopt.state_bytes(opt) <= 0.51 * eopt.state_bytes(adamw)


def test_state_dict_round_trip_and_scheduler() -> None:
    model = _tiny_llama()
    twin = copy.deepcopy(model)
    opt = AdamMini(model.named_parameters(), lr=1e-3, dim=32, n_heads=4, n_kv_heads=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    _train(model, opt, 3)
    sched.step()
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)
    opt2 = AdamMini(twin.named_parameters(), lr=1e-3, dim=32, n_heads=4, n_kv_heads=2)
    twin.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared tensors
    _train(model, opt, 2, seed=7)
    _train(twin, opt2, 2, seed=7)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_zero_and_rank_one_gradients_stay_finite() -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = eopt.build([("w", w)], "adam_mini", hints={"w": {"role": "q", "n_heads": 2}})
    w.grad = torch.zeros_like(w)
    opt.step()
    w.grad = torch.outer(torch.randn(8), torch.randn(6))
    opt.step()
    assert torch.isfinite(w).all()


def test_bad_hints_raise_naming_the_argument() -> None:
    w = torch.nn.Parameter(torch.randn(9, 6))
    with pytest.raises(ValueError, match="n_heads"):
        eopt.build([("w", w)], "adam_mini", hints={"w": {"role": "q", "n_heads": 2}})
    with pytest.raises(ValueError, match="split_qkv"):
        eopt.build([("w", w)], "adam_mini", hints={"w": {"role": "qkv", "n_heads": 3}})
    with pytest.raises(ValueError, match="dim"):
        AdamMini([("layer.q_proj.weight", w)])


def test_recipe_hints_give_per_head_blocks_for_gpt2_and_gqa_llama() -> None:
    """With the recipe's own hints (recipes.models.param_hints): fused c_attn and GQA K get per-head blocks."""
    from recipes.models import param_hints

    gpt2, llama = _tiny_gpt2(), _tiny_llama()
    for model, name, blocks in (
        (gpt2, "transformer.h.0.attn.c_attn.weight", 4 + 4 + 32),
        (llama, "model.layers.0.self_attn.k_proj.weight", 2),
        (llama, "model.layers.0.self_attn.q_proj.weight", 4),
    ):
        opt = eopt.build(model.named_parameters(), "adam_mini", hints=param_hints(model))
        assert opt.state[dict(model.named_parameters())[name]]["exp_avg_sq"].numel() == blocks, name
