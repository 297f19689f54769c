"""Adam-mini and Adafactor on FSDP2 and HSDP shards equal the same optimizer in one process (gloo, CPU ranks).

Their statistics span shards (Adam-mini's block second moments, Adafactor's column factor and RMS terms), so
the cases cover what a partial sum can get wrong: blocks that straddle a shard boundary (3 heads of 2 rows at
2 shards), stored (in, out) weights whose every block spans all ranks, fused QKV, whole-tensor blocks, uneven
and empty shards, and Adafactor's relative step and update clip. Every run is at 2 shards: FSDP on 2 ranks
and HSDP 2 x 2 on 4. Besides the parity, each rank counts the all-reduces of a step (one per param group per
phase) and a 2-rank DCP checkpoint loaded into one process holds the one-process state.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

import eopt
from eopt.distributed import is_sharded, local_slice
from tests.distributed_utils import Tensors, _full_grads, optimizer_parity, shard, spawn

pytestmark = pytest.mark.distributed

# Llama-like: width 6, 3 heads of 2 rows (Q's head 1 straddles the 3/3 shard boundary), GQA K/V with 2 heads,
# odd row counts (11 splits 6/5) and a (1, 6) weight and (1,) norm that leave rank 1 empty; plus a bias.
LLAMA_SHAPES = {
    "model.embed_tokens.weight": (11, 6),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.layers.0.self_attn.q_proj.weight": (6, 6),
    "model.layers.0.self_attn.k_proj.weight": (4, 6),
    "model.layers.0.self_attn.v_proj.weight": (4, 6),
    "model.layers.0.self_attn.o_proj.weight": (6, 6),
    "model.layers.0.mlp.gate_proj.weight": (9, 6),
    "model.layers.0.mlp.down_proj.weight": (6, 9),
    "model.layers.0.mlp.extra.weight": (1, 6),
    "model.layers.0.mlp.extra.bias": (5,),
    "model.layers.0.tiny_norm.weight": (1,),
    "model.norm.weight": (6,),
    "lm_head.weight": (11, 6),
}
LLAMA_HINTS = {
    "model.embed_tokens.weight": {"role": "embedding"},
    "model.layers.0.input_layernorm.weight": {"role": "norm"},
    "model.layers.0.self_attn.q_proj.weight": {"role": "q", "n_heads": 3},
    "model.layers.0.self_attn.k_proj.weight": {"role": "k", "n_heads": 2},
    "model.layers.0.self_attn.v_proj.weight": {"role": "v", "n_heads": 2},
    "model.layers.0.self_attn.o_proj.weight": {"role": "attn_out", "n_heads": 3},
    "model.layers.0.mlp.gate_proj.weight": {"role": "mlp"},
    "model.layers.0.mlp.down_proj.weight": {"role": "mlp"},
    "model.layers.0.mlp.extra.weight": {"role": "mlp"},
    "model.layers.0.mlp.extra.bias": {"role": "bias"},
    "model.layers.0.tiny_norm.weight": {"role": "norm"},
    "model.norm.weight": {"role": "norm"},
    "lm_head.weight": {"role": "head"},
}

# GPT-2-like: Conv1D weights stored (in, out), so Shard(0) cuts the *in* dim and every per-neuron and per-head
# block spans both ranks; c_attn is fused QKV (3 heads of 2 for Q and K, per neuron for V); wpe is one block
# cut 3/2; the (1, 6) Conv1D leaves rank 1 no rows but all columns.
GPT2_SHAPES = {
    "transformer.wte.weight": (11, 6),
    "transformer.wpe.weight": (5, 6),
    "transformer.h.0.ln_1.weight": (6,),
    "transformer.h.0.attn.c_attn.weight": (6, 18),
    "transformer.h.0.attn.c_attn.bias": (18,),
    "transformer.h.0.attn.c_proj.weight": (6, 6),
    "transformer.h.0.mlp.c_fc.weight": (6, 10),
    "transformer.h.0.mlp.c_proj.weight": (10, 6),
    "transformer.h.0.mlp.c_small.weight": (1, 6),
    "transformer.h.0.mlp.c_proj.bias": (6,),
}
GPT2_HINTS = {
    "transformer.wte.weight": {"role": "embedding"},
    "transformer.wpe.weight": {"role": "pos_embedding"},
    "transformer.h.0.ln_1.weight": {"role": "norm"},
    "transformer.h.0.attn.c_attn.weight": {"role": "qkv", "in_out": True, "split_qkv": (6, 6, 6), "n_heads": 3},
    "transformer.h.0.attn.c_attn.bias": {"role": "bias"},
    "transformer.h.0.attn.c_proj.weight": {"role": "attn_out", "in_out": True, "n_heads": 3},
    "transformer.h.0.mlp.c_fc.weight": {"role": "mlp", "in_out": True},
    "transformer.h.0.mlp.c_proj.weight": {"role": "mlp", "in_out": True},
    "transformer.h.0.mlp.c_small.weight": {"role": "mlp", "in_out": True},
    "transformer.h.0.mlp.c_proj.bias": {"role": "bias"},
}

# Adafactor: matrices with uneven and empty shards, a tall (7, 1), a 3-D tensor (factored over its last two
# dims, sharded on its batch dim) and vectors, one of which leaves rank 1 empty.
ADAFACTOR_SHAPES = {
    "a.weight": (5, 6),
    "b.weight": (1, 4),
    "c.weight": (12, 8),
    "d.weight": (7, 1),
    "e.weight": (3, 5, 4),
    "c.bias": (12,),
    "f.bias": (1,),
}

ADAM_MINI_HPARAMS = (
    {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1},
    {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "foreach": True},
)
ADAFACTOR_HPARAMS = (
    {},  # relative step: alpha = min(lr, 1/sqrt(t)) * max(eps2, RMS(p))
    {"lr": 1e-2, "relative_step": False, "beta1": 0.9, "weight_decay": 0.1},
    {"lr": 0.05, "eps": (1e-20, 1e-2), "beta2_decay": -0.5, "d": 1.2},
)
CASES = [("adam_mini", LLAMA_SHAPES, LLAMA_HINTS, h) for h in ADAM_MINI_HPARAMS]
CASES += [("adam_mini", GPT2_SHAPES, GPT2_HINTS, h) for h in ADAM_MINI_HPARAMS]
CASES += [("adafactor", ADAFACTOR_SHAPES, {}, h) for h in ADAFACTOR_HPARAMS]


def _named(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n.replace("__", "."), p) for n, p in module.named_parameters()]


def _set_grads(module: torch.nn.Module, shapes: dict, step: int) -> None:
    """The full gradients of ``optimizer_parity``'s step ``step``, each rank's shard of them for DTensors."""
    grads = _full_grads(shapes, step)
    for name, p in _named(module):
        g = grads[name]
        if is_sharded(p):
            part = local_slice(g, p).clone()
            g = DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        p.grad = g


def _all_reduces_per_step(world_size: int, kind: str, name: str, shapes: dict, hints: dict, hparams: dict) -> int:
    """How many ``dist.all_reduce`` calls one step of the sharded optimizer makes."""
    module = shard(Tensors(shapes), kind, world_size)
    opt = eopt.build(_named(module), name, hints=hints, **hparams)
    _set_grads(module, shapes, 0)
    calls, all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
    try:
        opt.step()
    finally:
        dist.all_reduce = all_reduce
    return len(calls)


def _expected_all_reduces(name: str, shapes: dict, hints: dict, hparams: dict) -> int:
    """One per Adam-mini group with blocks (biases need none); per Adafactor group, the clip's and, with the
    relative step or a matrix, the first phase's."""
    opt = eopt.build(_named(Tensors(shapes)), name, hints=hints, **hparams)
    if name == "adam_mini":
        return sum(group["role"] != "bias" for group in opt.param_groups)
    return sum(1 + (group["relative_step"] or any(p.ndim == 2 for p in group["params"])) for group in opt.param_groups)


def _parity_cases(rank: int, world_size: int, kind: str) -> None:
    for name, shapes, hints, hparams in CASES:
        optimizer_parity(rank, world_size, kind, name, shapes, hints, hparams)
        got = _all_reduces_per_step(world_size, kind, name, shapes, hints, hparams)
        want = _expected_all_reduces(name, shapes, hints, hparams)
        assert got == want, f"{name} {kind} {hparams}: {got} all-reduces in a step, expected {want}"


@pytest.mark.parametrize(("kind", "world_size"), [("fsdp", 2), ("hsdp", 4)])
def test_adam_mini_and_adafactor_match_one_process(kind: str, world_size: int) -> None:
    spawn(_parity_cases, world_size, kind)


def test_adafactor_cases_engage_the_update_clip() -> None:
    """The clip ``max(1, RMS(U) / d)`` acts in the parity cases: without it (huge d) the one-process result differs."""

    def run(hparams: dict) -> list[torch.Tensor]:
        module = Tensors(ADAFACTOR_SHAPES)
        opt = eopt.build(_named(module), "adafactor", **hparams)
        for step in range(5):
            _set_grads(module, ADAFACTOR_SHAPES, step)
            opt.step()
        return [p.detach() for p in module.parameters()]

    for hparams in ADAFACTOR_HPARAMS:
        clipped, unclipped = run(hparams), run({**hparams, "d": 1e30})
        assert any(not torch.equal(a, b) for a, b in zip(clipped, unclipped, strict=True)), hparams


DCP_CASES = [
    ("adam_mini", LLAMA_SHAPES, LLAMA_HINTS, ADAM_MINI_HPARAMS[0]),
    ("adam_mini", GPT2_SHAPES, GPT2_HINTS, ADAM_MINI_HPARAMS[0]),
    ("adafactor", ADAFACTOR_SHAPES, {}, ADAFACTOR_HPARAMS[1]),
]


def _save_after_steps(rank: int, world_size: int, directory: str, steps: int) -> None:
    for i, (name, shapes, hints, hparams) in enumerate(DCP_CASES):
        module = shard(Tensors(shapes), "fsdp", world_size)
        opt = eopt.build(_named(module), name, hints=hints, **hparams)
        for step in range(steps):
            _set_grads(module, shapes, step)
            opt.step()
        dcp.save({"optim": get_optimizer_state_dict(module, opt)}, checkpoint_id=f"{directory}/{i}")


def test_two_rank_checkpoint_loads_into_one_process(tmp_path) -> None:
    """Every state tensor saved by DCP from 2 FSDP ranks, loaded into one process, equals the one-process state."""
    steps = 3
    spawn(_save_after_steps, 2, str(tmp_path), steps)
    for i, (name, shapes, hints, hparams) in enumerate(DCP_CASES):
        reference = Tensors(shapes)
        ref_opt = eopt.build(_named(reference), name, hints=hints, **hparams)
        for step in range(steps):
            _set_grads(reference, shapes, step)
            ref_opt.step()
        module = Tensors(shapes)
        opt = eopt.build(_named(module), name, hints=hints, **hparams)
        state = {"optim": get_optimizer_state_dict(module, opt)}
        dcp.load(state, checkpoint_id=f"{tmp_path}/{i}")
        set_optimizer_state_dict(module, opt, state["optim"])
        for (pname, p), ref in zip(_named(module), reference.parameters(), strict=True):
            for key, want in ref_opt.state[ref].items():
                got = opt.state[p][key]
                assert got.shape == want.shape, f"{name} {pname} {key}: shape {tuple(got.shape)}"
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"{name} {pname} {key}")
