"""The recipe under DDP, FSDP2 and HSDP (gloo ranks on CPU) against one process, for every optimizer.

Every run is a real ``recipes.trainer.train`` call on the embedded dataset with a 2-layer model. The
layout gives bitwise-equal gradients (one micro-batch per rank against the same micro-batches accumulated
in one process, every process on one thread), so the runs must agree within 1e-5 relative, SOAP and
Shampoo included (see ``../shared/notes/distributed-audit.md``). One fixture runs everything in a few
multi-process launches, each rank running its cases one after another; the tests then compare the outputs:

- parity: 7 optimizers x {fsdp, ddp} x {gpt2, llama} on 2 ranks, train and val losses of every step and the
  exported (``save_pretrained``) weights, loaded with Hugging Face;
- uneven shards (fsdp on 3 ranks) and HSDP on 4 ranks (2 x 2). There the gradients are the same sums in
  another order (a mean over 3 ranks divides by 3; HSDP adds pairs of ranks before the replicas), equal to fp32
  rounding but not bitwise, so these cases use optimizers that do not amplify rounding chaotically (not SOAP or
  Shampoo, whose rank-deficient factors do; the optimizer-level tests cover them on uneven shards) and compare
  the weights at ``REASSOCIATED_RTOL``;
- resume at another world size and layout for every optimizer (fsdp 2 -> single, single -> fsdp 2,
  fsdp 2 -> ddp 2): the checkpoint of step 3 is resumed and steps 4-6 must match the run that went on.

Muon, SOAP and Shampoo run owner-computes (``parallelism.matrix_update=owner``, the default): each matrix's work
on one rank, its SOAP/Shampoo state, NorMuon's second moments (an eighth case, "normuon") and under DDP Muon's
momentum held there only.
A resume from fsdp 2 to fsdp 3 ranks moves each matrix's state to its new owner, for the three of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.distributed_utils import losses, spawn
from tests.tiny import TINY_GPT2, TINY_LLAMA

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
# NorMuon: its second moments live on each matrix's owner only.
VARIANTS = {"normuon": ["optimizer=muon", "optimizer.second_moment=normuon"]}
# Owner state moved to new owners by a resume on more ranks.
OWNER_STATE = ("normuon", "soap", "shampoo")
OPTIMIZERS = ("adamw", "muon", "soap", "shampoo", "adam_mini", "adafactor", "sophia", *VARIANTS)
MODELS = {
    "gpt2": ["model=gpt2_tiny", *TINY_GPT2],
    "llama": TINY_LLAMA,
}
# Each optimizer's preconditioner refreshes (and Sophia's Hessian estimates) inside the six steps.
OPTIMIZER_ARGS = {
    "soap": ["optimizer.precondition_frequency=2"],
    "shampoo": ["optimizer.precondition_frequency=2", "optimizer.start_preconditioning_step=2"],
    "sophia": ["optimizer.hessian_interval=2"],
}
TRAIN = [
    "train.seq_len=32",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.eval_tokens=1024",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=2",
    "logger.progress=false",
]
RTOL = 1e-5
# Weights whose gradients are the same sums in another order: Adam-style normalization of the smallest
# gradients (rare tokens' embedding rows) turns their 1e-7 rounding into up to ~2e-5 of the tensor's scale.
# Sophia is such a case at every world size: its Hessian batch is one micro-batch split over the ranks, whose
# weight gradients one process sums in one GEMM and the ranks in one GEMM each plus an all-reduce.
REASSOCIATED_RTOL = 1e-4


# Shampoo's root inverses amplify the 1e-7 differences of 3 ranks' reassociated gradient sums to 2.2e-4 of the
# tensor's scale. The losses still agree within RTOL; tests/test_distributed_owner.py checks owner-computes on
# identical gradients (Muon bitwise, SOAP and Shampoo within 1e-5), resumes at other world sizes included.
ROOTS_RTOL = 1e-3


def weights_rtol(optimizer: str) -> float:
    return REASSOCIATED_RTOL if optimizer == "sophia" else RTOL


def overrides(data_root: Path, model: str, optimizer: str, *extra: str) -> list[str]:
    return [
        f"data.root={data_root}",
        *MODELS[model],
        *VARIANTS.get(optimizer, [f"optimizer={optimizer}"]),
        *OPTIMIZER_ARGS.get(optimizer, []),
        *TRAIN,
        *extra,
    ]


def run_cases(rank: int, world_size: int, cases: list[tuple[list[str], str]]) -> None:
    """Every rank trains each ``(overrides, run_dir)`` case in turn (one spawned job for many runs)."""
    from recipes.config import register_configs, resolve_config
    from recipes.trainer import train

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for case_overrides, run_dir in cases:
            train(resolve_config(compose("train", overrides=case_overrides)), Path(run_dir))


def assert_same_losses(run: Path, reference: Path, from_step: int = 0) -> None:
    got = {k: v for k, v in losses(run).items() if k[0] >= from_step}
    want = {k: v for k, v in losses(reference).items() if k[0] >= from_step}
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    assert len([k for k in got if k[1] == "train/loss"]) >= 3
    for key in sorted(want):
        assert got[key] == pytest.approx(want[key], rel=RTOL), (key, got[key], want[key])


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the key part of GPT-2's fused ``c_attn`` bias zeroed.

    Adding a constant vector to every key shifts a query's attention scores by one constant, which softmax
    ignores: the key bias has no effect on the model and an exactly zero true gradient. What it receives is
    rounding noise, which sign-like updates (Sophia's clip, Adam's normalization) turn into steps of the LR's
    size, different for any other summation order. The model's function does not depend on it.
    """
    if not name.endswith("attn.c_attn.bias"):
        return tensor
    width = tensor.shape[0] // 3
    return torch.cat([tensor[:width], torch.zeros(width), tensor[2 * width :]])


def assert_same_weights(run: Path, reference: Path, rtol: float = RTOL) -> None:
    got, want = load_file(run / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        a, b = without_key_bias(name, got[name]), without_key_bias(name, want[name])
        error = ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
        assert error <= rtol, (name, error)


def resumable_copy(source: Path, target: Path) -> Path:
    """``source``'s run directory as it was at the step-3 checkpoint: the later checkpoint and outputs removed."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step_00000006")
    shutil.rmtree(target / "model")
    (target / "summary.json").unlink()
    return target


@pytest.fixture(scope="module")
def runs(pystdlib_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train every case; returns the directory of their run directories (see the module docstring)."""
    root = tmp_path_factory.mktemp("recipe_runs")
    one, two, three, four = [], [], [], []
    for model in MODELS:
        for opt in OPTIMIZERS:
            base = overrides(pystdlib_data_root, model, opt, "train.batch_size=4", "train.micro_batch_size=2")
            one.append((base, str(root / f"single-{model}-{opt}")))
            two.append((base + ["parallelism=fsdp", "train.async_checkpoint=true"], str(root / f"fsdp-{model}-{opt}")))
            two.append((base + ["parallelism=ddp"], str(root / f"ddp-{model}-{opt}")))
    uneven = [("llama", "muon"), ("gpt2", "adam_mini"), ("gpt2", "adafactor")]
    for model, opt in uneven:
        base = overrides(pystdlib_data_root, model, opt, "train.batch_size=6", "train.micro_batch_size=2")
        one.append((base, str(root / f"single6-{model}-{opt}")))
        three.append((base + ["parallelism=fsdp"], str(root / f"fsdp3-{model}-{opt}")))
    for model, opt in (("llama", "adamw"), ("gpt2", "muon")):
        base = overrides(pystdlib_data_root, model, opt, "train.batch_size=4", "train.micro_batch_size=1")
        one.append((base, str(root / f"single4x1-{model}-{opt}")))
        four.append((base + ["parallelism=hsdp", "parallelism.shard=2"], str(root / f"hsdp-{model}-{opt}")))
    spawn(run_cases, 1, one)
    spawn(run_cases, 2, two)
    spawn(run_cases, 3, three)
    spawn(run_cases, 4, four)

    to_one, to_two = [], []
    for opt in OPTIMIZERS:
        llama = overrides(pystdlib_data_root, "llama", opt, "train.batch_size=4", "train.micro_batch_size=2")
        gpt2 = overrides(pystdlib_data_root, "gpt2", opt, "train.batch_size=4", "train.micro_batch_size=2")
        resumed = resumable_copy(root / f"fsdp-llama-{opt}", root / f"fsdp-to-single-llama-{opt}")
        to_one.append((llama, str(resumed)))
        resumed = resumable_copy(root / f"single-gpt2-{opt}", root / f"single-to-fsdp-gpt2-{opt}")
        to_two.append((gpt2 + ["parallelism=fsdp"], str(resumed)))
        resumed = resumable_copy(root / f"fsdp-gpt2-{opt}", root / f"fsdp-to-ddp-gpt2-{opt}")
        to_two.append((gpt2 + ["parallelism=ddp"], str(resumed)))
    # 2 -> 3 ranks: the 2-rank run that went on is the reference.
    six = {
        opt: overrides(pystdlib_data_root, "gpt2", opt, "train.batch_size=6", "train.micro_batch_size=1")
        for opt in OWNER_STATE
    }
    spawn(
        run_cases,
        2,
        to_two + [(six[opt] + ["parallelism=fsdp"], str(root / f"fsdp-gpt2-six-{opt}")) for opt in OWNER_STATE],
    )
    to_three = []
    for opt in OWNER_STATE:
        resumed = resumable_copy(root / f"fsdp-gpt2-six-{opt}", root / f"fsdp-to-fsdp3-gpt2-six-{opt}")
        to_three.append((six[opt] + ["parallelism=fsdp"], str(resumed)))
    spawn(run_cases, 3, to_three)
    spawn(run_cases, 1, to_one)
    return root


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_equal_one_process(runs, mode, optimizer, model):
    run, reference = runs / f"{mode}-{model}-{optimizer}", runs / f"single-{model}-{optimizer}"
    assert_same_losses(run, reference)
    assert_same_weights(run, reference, weights_rtol(optimizer))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parallelism"] == f"{mode} 2 ranks"
    assert summary["optim/state_bytes_total"] >= summary["optim/state_bytes"] > 0
    if mode == "fsdp":  # sharded state: no rank holds all of it
        assert summary["optim/state_bytes"] < summary["optim/state_bytes_total"]


def test_sharded_export_loads_with_hugging_face(runs):
    run, reference = runs / "fsdp-llama-adamw", runs / "single-llama-adamw"
    got = AutoModelForCausalLM.from_pretrained(run / "model")
    want = AutoModelForCausalLM.from_pretrained(reference / "model")
    inputs = torch.arange(16).view(1, 16)
    torch.testing.assert_close(got(input_ids=inputs).logits, want(input_ids=inputs).logits, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize(("model", "optimizer"), [("llama", "muon"), ("gpt2", "adam_mini"), ("gpt2", "adafactor")])
def test_uneven_shards_on_three_ranks(runs, model, optimizer):
    run, reference = runs / f"fsdp3-{model}-{optimizer}", runs / f"single6-{model}-{optimizer}"
    assert_same_losses(run, reference)
    assert_same_weights(run, reference, REASSOCIATED_RTOL)


@pytest.mark.parametrize(("model", "optimizer"), [("llama", "adamw"), ("gpt2", "muon")])
def test_hsdp_two_by_two(runs, model, optimizer):
    run, reference = runs / f"hsdp-{model}-{optimizer}", runs / f"single4x1-{model}-{optimizer}"
    assert json.loads((run / "summary.json").read_text())["parallelism"] == "hsdp 2x2 ranks"
    assert_same_losses(run, reference)
    assert_same_weights(run, reference, REASSOCIATED_RTOL)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize(
    ("resumed", "source"),
    [("fsdp-to-single-llama", "fsdp-llama"), ("single-to-fsdp-gpt2", "single-gpt2"), ("fsdp-to-ddp-gpt2", "fsdp-gpt2")],
)
def test_resume_at_another_world_size(runs, resumed, source, optimizer):
    run, original = runs / f"{resumed}-{optimizer}", runs / f"{source}-{optimizer}"
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert_same_losses(run, original, from_step=4)
    assert_same_weights(run, original, weights_rtol(optimizer))


@pytest.mark.parametrize("optimizer", OWNER_STATE)
def test_owner_state_moves_to_its_new_owner_from_two_to_three_ranks(runs, optimizer):
    run, original = runs / f"fsdp-to-fsdp3-gpt2-six-{optimizer}", runs / f"fsdp-gpt2-six-{optimizer}"
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert_same_losses(run, original, from_step=4)
    assert_same_weights(run, original, ROOTS_RTOL if optimizer == "shampoo" else REASSOCIATED_RTOL)
