"""The eopt core against torch.optim.AdamW and the routing contract of DESIGN.md: AdamW and every backup-AdamW
group, build() routing/rules/hints/errors, eager state, state_dict round trips and LR schedulers."""

from __future__ import annotations

import io

import pytest
import torch

import eopt
from eopt.registry import OPTIMIZERS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class TinyLM(torch.nn.Module):
    """Llama-shaped names: embedding, attention, MLP, norms, untied head."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, dim)
        self.q_proj = torch.nn.Linear(dim, dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, dim // 2, bias=False)
        self.mlp = torch.nn.Linear(dim, 3 * dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)


HINTS = {
    "embed_tokens.weight": {"role": "embedding"},
    "lm_head.weight": {"role": "head"},
    "q_proj.weight": {"role": "q", "n_heads": 4, "n_kv_heads": 2},
    "k_proj.weight": {"role": "k", "n_heads": 4, "n_kv_heads": 2},
    "mlp.weight": {"role": "mlp"},
    "norm.weight": {"role": "norm"},
}


def clone_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in module.parameters()]


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


# ---------------------------------------------------------------- AdamW and backup AdamW vs torch.optim.AdamW


def assert_same_after_20_steps(opt, ours, ref, theirs) -> None:
    """Step both optimizers 20 times on the same gradients; parameters must agree to 1e-6 relative."""
    for step in range(20):
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        assert rel(p.detach(), q.detach()) <= 1e-6


@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
        {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    ],
)
def test_adamw_matches_torch(hp):
    torch.manual_seed(0)
    model = TinyLM()
    ours, theirs = clone_params(model), clone_params(model)
    opt = eopt.AdamW(ours, **hp)
    ref = torch.optim.AdamW(theirs, **hp)
    assert_same_after_20_steps(opt, ours, ref, theirs)


def test_adamw_per_group_hyperparameters_match_torch():
    torch.manual_seed(1)
    model = TinyLM()
    ours, theirs = clone_params(model), clone_params(model)

    def groups(ps):
        return [
            {"params": ps[:3], "lr": 2e-3, "weight_decay": 0.2},
            {"params": ps[3:], "betas": (0.5, 0.9), "eps": 1e-5},
        ]

    opt = eopt.AdamW(groups(ours), lr=1e-3)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-3)
    assert_same_after_20_steps(opt, ours, ref, theirs)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizers_backup_adamw_matches_torch(name):
    torch.manual_seed(2)
    model = TinyLM()
    hp = {"lr": 4e-3, "betas": (0.85, 0.97), "eps": 1e-7, "weight_decay": 0.05}
    ours, theirs = clone_params(model), clone_params(model)
    names = [n for n, _ in model.named_parameters()]
    # Every parameter routed to the backup AdamW by an explicit rule (1-D ones decayed too, like torch);
    # eopt.AdamW's own groups take the hyperparameters directly.
    kw = {**hp} if name == "adamw" else {"backup": hp}
    opt = eopt.build(zip(names, ours, strict=True), name, rules={".": "adamw"}, decay_1d=True, **kw)
    assert {g["algorithm"] for g in opt.param_groups} == {"adamw"}
    ref = torch.optim.AdamW(theirs, **hp)
    assert_same_after_20_steps(opt, ours, ref, theirs)


def test_backup_groups_next_to_muon_match_torch_adamw():
    torch.manual_seed(3)
    model = TinyLM()
    hp = {"lr": 8e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    named = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in model.named_parameters()]
    opt = eopt.build(named, "muon", backup=hp, hints=HINTS)
    backup_names = {n for g in opt.param_groups if g["algorithm"] == "adamw" for n in g["param_names"]}
    assert backup_names == {"embed_tokens.weight", "lm_head.weight", "mlp.bias", "norm.weight", "norm.bias"}
    # torch reference: decayed embedding/head, undecayed 1-D (build's default decay_1d=False).
    ref_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in named if n in backup_names}
    matrices = [p for p in ref_params.values() if p.ndim >= 2]
    vectors = [p for p in ref_params.values() if p.ndim < 2]
    ref = torch.optim.AdamW([{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], **hp)
    for step in range(20):
        gen = torch.Generator().manual_seed(1000 + step)
        for n, p in named:
            p.grad = torch.randn(p.shape, generator=gen)
            if n in ref_params:
                ref_params[n].grad = p.grad.clone()
        opt.step()
        ref.step()
    for n, p in named:
        if n in backup_names:
            assert rel(p.detach(), ref_params[n].detach()) <= 1e-6


# ---------------------------------------------------------------- build(): routing, rules, hints


def groups_by_algorithm(opt) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for g in opt.param_groups:
        out.setdefault(g["algorithm"], set()).update(g["param_names"])
    return out


def test_default_routing_sends_hidden_matrices_to_the_algorithm():
    opt = eopt.build(TinyLM().named_parameters(), "muon", hints=HINTS)
    routed = groups_by_algorithm(opt)
    assert routed["muon"] == {"q_proj.weight", "k_proj.weight", "mlp.weight"}
    assert routed["adamw"] == {"embed_tokens.weight", "lm_head.weight", "mlp.bias", "norm.weight", "norm.bias"}


def test_without_hints_embeddings_are_matrices_and_1d_is_backup():
    # eopt never guesses roles from names: without a hint a 2-D embedding is a matrix.
    routed = groups_by_algorithm(eopt.build(TinyLM().named_parameters(), "muon"))
    assert "embed_tokens.weight" in routed["muon"] and "norm.weight" in routed["adamw"]


def test_adamw_routing_is_all():
    opt = eopt.build(TinyLM().named_parameters(), "adamw", hints=HINTS, lr=2e-3)
    assert {g["algorithm"] for g in opt.param_groups} == {"adamw"}
    assert all(g["lr"] == 2e-3 for g in opt.param_groups)


def test_explicit_rules_win_in_order():
    rules = {r"^mlp\.": "adamw", r"lm_head": "muon", r"proj": "adamw"}
    routed = groups_by_algorithm(eopt.build(TinyLM().named_parameters(), "muon", hints=HINTS, rules=rules))
    assert routed["muon"] == {"lm_head.weight"}
    assert {"mlp.weight", "q_proj.weight", "k_proj.weight"} <= routed["adamw"]


def test_hints_reach_the_groups_and_split_them():
    opt = eopt.build(TinyLM().named_parameters(), "muon", hints=HINTS)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["q_proj.weight"]["role"] == "q" and by_name["q_proj.weight"]["n_kv_heads"] == 2
    assert by_name["k_proj.weight"]["role"] == "k"
    assert by_name["q_proj.weight"] is not by_name["mlp.weight"]
    assert by_name["norm.bias"]["role"] == "vector" and by_name["mlp.weight"]["role"] == "mlp"


def test_backup_hyperparameters_and_decay_1d():
    backup = {"lr": 5e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}
    opt = eopt.build(TinyLM().named_parameters(), "muon", hints=HINTS, backup=backup, lr=0.01)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["lm_head.weight"]["lr"] == 5e-3 and by_name["lm_head.weight"]["weight_decay"] == 0.1
    assert by_name["lm_head.weight"]["eps"] == 1e-8  # missing keys take torch's AdamW defaults
    assert by_name["norm.weight"]["weight_decay"] == 0.0
    assert by_name["q_proj.weight"]["lr"] == 0.01
    opt = eopt.build(TinyLM().named_parameters(), "muon", hints=HINTS, backup=backup, decay_1d=True)
    assert {g["weight_decay"] for g in opt.param_groups if g["algorithm"] == "adamw"} == {0.1}


def test_frozen_parameters_are_left_out():
    model = TinyLM()
    model.embed_tokens.weight.requires_grad_(False)
    opt = eopt.build(model.named_parameters(), "muon", hints=HINTS)
    assert "embed_tokens.weight" not in {n for g in opt.param_groups for n in g["param_names"]}


def test_registry_entries_expose_constructor_defaults():
    assert OPTIMIZERS["adamw"].defaults == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    muon = OPTIMIZERS["muon"]
    assert muon.cls is eopt.Muon and muon.routing == "matrices"
    assert muon.defaults["lr"] == 0.02 and muon.defaults["coefficients"] == "simple"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "lion"}, "unknown optimizer 'lion'"),
        ({"name": "muon", "momentum_beta": 0.9}, "unknown hyperparameter 'momentum_beta'"),
        ({"name": "muon", "backup": {"beta1": 0.9}}, "unknown backup hyperparameter 'beta1'"),
        ({"name": "muon", "rules": {"q_proj": "soap"}}, "invalid rules"),
        ({"name": "muon", "hints": {"q_proj.weight": {"heads": 4}}}, "invalid hints"),
        ({"name": "muon", "hints": {"q_proj.weight": {"role": "query"}}}, "invalid hints"),
        ({"name": "muon", "routing": "some"}, "invalid routing"),
        ({"name": "muon", "backup": {"lr": -1.0}}, "invalid lr"),
        ({"name": "muon", "backup": {"betas": (0.9, 1.0)}}, "invalid betas"),
        ({"name": "adamw", "eps": -1.0}, "invalid eps"),
        ({"name": "adamw", "weight_decay": -0.1}, "invalid weight_decay"),
        ({"name": "muon", "lr": -0.02}, "invalid lr"),
    ],
)
def test_build_errors_name_the_argument(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        eopt.build(TinyLM().named_parameters(), name, **kwargs)


def test_build_without_trainable_parameters_is_an_error():
    model = TinyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        eopt.build(model.named_parameters(), "adamw")


def test_a_group_for_another_algorithm_is_refused():
    with pytest.raises(ValueError, match="invalid algorithm"):
        eopt.Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "algorithm": "soap"}])


# ---------------------------------------------------------------- state: eager, round trip, schedulers


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_is_created_eagerly(name):
    model = TinyLM()
    opt = eopt.build(model.named_parameters(), name, hints=HINTS)
    assert all(len(opt.state[p]) > 0 for p in model.parameters())
    assert eopt.state_bytes(opt) > 0


def test_adamw_state_dict_round_trip_is_bitwise():
    torch.manual_seed(4)
    model, twin = TinyLM(), TinyLM()
    twin.load_state_dict(model.state_dict())
    opt = eopt.build(model.named_parameters(), "adamw", weight_decay=0.1)
    for step in range(3):
        set_grads(list(model.parameters()), step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    twin.load_state_dict(saved["model"])
    twin_opt = eopt.build(twin.named_parameters(), "adamw", weight_decay=0.1)
    twin_opt.load_state_dict(saved["optim"])
    for step in range(3, 8):
        set_grads(list(model.parameters()), step)
        set_grads(list(twin.parameters()), step)
        opt.step()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_scheduler_scales_every_group(name):
    opt = eopt.build(TinyLM().named_parameters(), name, hints=HINTS, backup={"lr": 1e-3})
    assert len(opt.param_groups) >= 3
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(5):
        opt.step()
        sched.step()
    factor = opt.param_groups[0]["lr"] / base[0]
    assert 0.0 < factor < 1.0
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * factor for lr in base])
