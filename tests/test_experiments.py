"""The experiment recipes in conf/experiment/: every one composes and passes the trainer's config checks, the
recipes of a family differ only in the optimizer, the speedrun recipe is the optimizer track's setup, and the
speedrun's data path and a cpu_bench sweep run offline on small local data (and the compare tool reads the sweep).

Oracles: the speedrun's published figures (REFERENCE.md: 524,288 tokens per step, target 3.28, 10,485,760 val
tokens, GPT-2 124M), eopt's registry for the optimizer names, and summary.json / metrics.jsonl of real runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import eopt
from recipes.compare import main as compare_main
from recipes.config import register_configs, resolve_config
from recipes.prepare import check_config as check_data_config
from recipes.trainer import check_config
from tests.conftest import write_dataset
from tests.tiny import TINY_GPT2, TINY_RUN

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "conf" / "experiment"
FAMILIES = ("cpu_bench", "speedrun_gpt2_124m", "llama_1b_fineweb")
RECIPES = sorted(
    f"{family}/{p.stem}" for family in FAMILIES for p in (EXPERIMENTS / family).glob("*.yaml") if p.stem != "_base"
)
WORLD = {"cpu_bench": 1, "speedrun_gpt2_124m": 8, "llama_1b_fineweb": 8}  # launch size each family is written for
TINY = [*TINY_GPT2, *TINY_RUN, "train.save_model=false", "train.compile=false", "train.device=cpu"]


def compose_recipe(name: str, *overrides: str):
    """(the composed config as the trainer sees it, the Hydra sweeper's params)."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    params = OmegaConf.to_container(params) if params is not None else {}
    with open_dict(cfg):
        del cfg["hydra"]
    return resolve_config(cfg), params


def test_every_family_has_a_recipe_per_optimizer():
    for family in FAMILIES:
        assert sorted(r.split("/")[1] for r in RECIPES if r.startswith(family + "/")) == sorted(eopt.OPTIMIZERS)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_passes_the_config_checks(name):
    family, optimizer = name.split("/")
    cfg, _ = compose_recipe(name, *(["parallelism=ddp"] if family == "speedrun_gpt2_124m" else []))
    assert cfg.optimizer["name"] == optimizer
    check_config(cfg, world_size=WORLD[family])
    check_data_config(cfg.data)


def _without_optimizer(cfg) -> dict:
    c = OmegaConf.to_container(OmegaConf.structured(cfg))
    del c["optimizer"]
    return c


@pytest.mark.parametrize("family", FAMILIES)
def test_recipes_of_a_family_differ_only_in_the_optimizer(family):
    configs = [compose_recipe(r)[0] for r in RECIPES if r.startswith(family + "/")]
    first = _without_optimizer(configs[0])
    for cfg in configs[1:]:
        assert _without_optimizer(cfg) == first, cfg.optimizer["name"]


def test_cpu_bench_grids_are_sweepable():
    seeds = set()
    for name in (r for r in RECIPES if r.startswith("cpu_bench/")):
        cfg, params = compose_recipe(name)
        lrs = [float(x) for x in str(params["optimizer.lr"]).split(",")]
        assert len(lrs) >= 4 and lrs == sorted(lrs), name
        seeds.add(str(params["seed"]))
        assert len(str(params["seed"]).split(",")) >= 2
        assert cfg.train.target_val_loss is None  # runs never stop early: same tokens for everyone
    assert len(seeds) == 1  # the same seeds for every optimizer


def test_speedrun_recipe_is_the_optimizer_track():
    cfg, _ = compose_recipe("speedrun_gpt2_124m/muon")
    assert cfg.train.batch_size * cfg.train.seq_len == 524_288
    assert cfg.train.target_val_loss == 3.28 and cfg.train.eval_tokens == 10_485_760
    assert (cfg.model.name, cfg.data.name, cfg.data.tokenizer) == ("gpt2_124m", "fineweb10b", "gpt2")
    # The shards it asks for hold every token of the step budget: no epoch boundary inside a run.
    assert cfg.data.max_tokens >= cfg.train.max_steps * 524_288


def run_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "HYDRA_FULL_ERROR"}
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_speedrun_data_path_runs_offline_on_local_shards(tmp_path):
    """The recipe's data config resolves to <root>/fineweb10b-gpt2-27shards; hand-made GPT-2 shards there (as the
    download leaves them, with its build settings) train with no network and no download."""
    rng = np.random.default_rng(0)

    def shard(n: int) -> np.ndarray:
        tokens = rng.integers(0, 50256, size=n).astype(np.uint16)
        tokens[::100] = 50256  # a document every 100 tokens, each starting with <|endoftext|>
        return tokens

    root = tmp_path / "data"
    directory = write_dataset(
        root / "fineweb10b-gpt2-27shards", [shard(5000), shard(5000)], [shard(2000)], vocab_size=50257, eot_token=50256
    )
    meta = json.loads((directory / "meta.json").read_text())
    meta["build"] = {"name": "fineweb10b", "tokenizer": "gpt2", "hf_path": "kjj0/fineweb10B-gpt2", "train_shards": 27}
    (directory / "meta.json").write_text(json.dumps(meta))
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    run_dir = tmp_path / "run"
    proc = run_train(
        "+experiment=speedrun_gpt2_124m/muon",
        f"data.root={root}",
        *TINY,
        "train.max_steps=3",
        "train.eval_every=3",
        f"hydra.run.dir={run_dir}",
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["data"], summary["optimizer"], summary["steps"]) == ("fineweb10b", "muon", 3)
    assert summary["tokens"] == 3 * 4 * 32 and summary["target_val_loss"] == 3.28
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before  # used as it is, not rebuilt


def test_a_cpu_bench_sweep_runs_and_the_compare_tool_reads_it(pystdlib_data_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "+experiment=cpu_bench/soap",
        f"data.root={pystdlib_data_root}",
        "optimizer.lr=1e-3,4e-3",  # replaces the recipe's grid; seeds too
        "seed=0",
        "train.max_tokens=4096",
        "train.eval_tokens=2048",
        "train.eval_every=1",
        "logger.progress=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0_lr0.001_seed0", "1_lr0.004_seed0"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in runs]
    for summary in summaries:
        assert (summary["model"], summary["optimizer"], summary["steps"], summary["tokens"]) == (
            "gpt2_cpu_bench",
            "soap",
            4,  # 4096 tokens at 8 x 128 per step
            4096,
        )
    out = tmp_path / "report"
    assert compare_main([str(sweep), "--baseline", "soap", "--out", str(out)]) == 0
    best = min(zip((1e-3, 4e-3), summaries, strict=True), key=lambda lr_s: lr_s[1]["final_val_loss"])[0]
    assert f"| soap | {best:g} |" in (out / "report.md").read_text()
