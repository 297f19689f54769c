"""recipes.parallel without extra processes: degrees, the launch environment, the start-up checks, one-rank meshes.

The start-up checks run before ``init_process_group``, so a launch of several ranks is simulated by setting
``WORLD_SIZE``/``RANK`` for one process: the error must come before any rank waits for another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.config import ParallelismConfig, TrainConfig
from recipes.errors import ConfigError
from recipes.parallel import World, degrees, first_host, world_from_env
from tests.tiny import TINY_GPT2, TINY_RUN

REPO = Path(__file__).resolve().parents[1]
SMALL = [*TINY_GPT2, *TINY_RUN]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR")


@pytest.mark.parametrize(
    ("name", "replicate", "shard", "world", "expected"),
    [
        ("ddp", 1, -1, 4, (4, 1)),
        ("fsdp", 1, -1, 4, (1, 4)),
        ("fsdp", -1, -1, 3, (1, 3)),
        ("hsdp", -1, 2, 4, (2, 2)),
        ("hsdp", 2, -1, 8, (2, 4)),
        ("hsdp", 1, 1, 1, (1, 1)),
    ],
)
def test_degrees(name, replicate, shard, world, expected):
    assert degrees(ParallelismConfig(name=name, replicate=replicate, shard=shard), world) == expected


@pytest.mark.parametrize(
    ("name", "replicate", "shard", "world", "fragment"),
    [
        ("hsdp", 2, 3, 4, "does not multiply to the world size 4"),
        ("hsdp", -1, 3, 4, "does not multiply"),
        ("hsdp", -1, -1, 4, "cannot both be -1"),
        ("hsdp", 0, 2, 4, "positive degree"),
        ("fsdp", 2, -1, 4, "is for hsdp"),
    ],
)
def test_bad_degrees(name, replicate, shard, world, fragment):
    with pytest.raises(ConfigError, match=fragment):
        degrees(ParallelismConfig(name=name, replicate=replicate, shard=shard), world)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gpu03", "gpu03"), ("gpu[03-05,9]", "gpu03"), ("gpu[7,9],cpu1", "gpu7"), ("a-b-1,c", "a-b-1")],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_world_from_torchrun_then_slurm_then_one_process(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert world_from_env() == World(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert world_from_env() == World(5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert world_from_env() == World(3, 4, 3)  # torchrun inside an allocation wins over SLURM's task numbers


def run_as_rank0(args: list[str], world_size: int) -> subprocess.CompletedProcess:
    """``train.py args`` as rank 0 of ``world_size`` ranks (the others are never started)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "HYDRA_FULL_ERROR"}
    env.update(RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "world_size", "fragment"),
    [
        (["parallelism=hsdp", "parallelism.shard=3"], 4, "does not multiply to the world size 4"),
        (["parallelism=ddp", "train.batch_size=6", "train.micro_batch_size=2"], 2, "multiple of 4"),
        (["parallelism=fsdp", "train.batch_size=4", "train.micro_batch_size=4"], 2, "multiple of 8"),
        (["parallelism=single"], 2, "use parallelism=ddp, fsdp or hsdp"),
        (["parallelism=fsdp", "optimizer=sophia", "optimizer.estimator=hutchinson"], 2, "hutchinson cannot run"),
        (["parallelism=ddp", "optimizer=sophia", "train.micro_batch_size=1"], 2, "micro_batch_size=1"),
        (["parallelism=fsdp", "parallelism.matrix_update=ownr"], 2, "matrix_update='ownr' is unknown"),
        (["parallelism=ddp", "optimizer=muon", "+optimizer.matrix_update=owner"], 2, "parallelism.matrix_update"),
        (["parallelism=tp"], 2, "parallelism/tp"),
    ],
)
def test_bad_parallel_launch_fails_with_one_line_before_any_work(tmp_path, args, world_size, fragment):
    run_dir = tmp_path / "run"
    args = [*SMALL, f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", *args]
    proc = run_as_rank0(args, world_size)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert fragment in errors[0], errors[0]
    assert not (tmp_path / "data").exists()  # nothing prepared, no rank waited for another


def test_fsdp_with_one_process_is_a_one_rank_mesh(pystdlib_data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        f"data.root={pystdlib_data_root}",
        f"hydra.run.dir={run_dir}",
        "parallelism=fsdp",
        "optimizer=muon",
        "train.max_steps=2",
        "train.save_model=false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "fsdp 1 rank (a one-rank mesh)" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["parallelism"] == "fsdp 1 rank (a one-rank mesh)"


def test_a_null_micro_batch_is_each_ranks_share_and_the_hessian_batch_stays_global():
    train = TrainConfig(batch_size=8, micro_batch_size=None)
    assert [train.micro_batch(world) for world in (1, 2, 4)] == [8, 4, 2]
    assert train.fresh_batch == 8
    explicit = TrainConfig(batch_size=8, micro_batch_size=2)
    assert [explicit.micro_batch(world) for world in (1, 2, 4)] == [2, 2, 2]
    assert explicit.fresh_batch == 2


def test_a_null_micro_batch_needs_a_batch_that_splits_over_the_ranks(tmp_path):
    args = [f"data.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}", "parallelism=ddp"]
    proc = run_as_rank0([*args, "train.batch_size=7"], 2)
    assert proc.returncode == 2
    assert "train.batch_size=7 is not divisible by 2 data-parallel ranks" in proc.stderr
    assert not (tmp_path / "data").exists()
