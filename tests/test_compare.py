"""The compare tool (recipes.compare) on run directories with known answers, on broken and partial runs, and on
a real tiny sweep of train.py.

Oracles: crossings and speedups worked out by hand from piecewise-linear curves; Welch's t from its formula and
its p-value from the closed-form CDF of Student's t with 2 degrees of freedom (two seeds a side, equal spread);
the speedrun rule's statistic by hand; for real runs, values read straight from their summary.json and
metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recipes.compare import Eval, crossing, main, speedrun_margin
from tests.tiny import TINY_GPT2, TINY_RUN

REPO = Path(__file__).resolve().parents[1]
MUON_RGB = (0xD6, 0x27, 0x28)  # the colour recipes.compare gives Muon in every plot


def write_run(
    directory: Path,
    optimizer: str,
    lr: float,
    seed: int,
    curve: list[tuple[int, float]],
    *,
    final: bool = True,
    ms_per_step: float = 100.0,
    optim_ms: float = 25.0,
    state_bytes: int = 2**20,
    tokens_per_step: int = 10,
    extra_config: dict | None = None,
) -> Path:
    """A run directory as train.py leaves it: ``curve`` is [(step, val loss)], train records every 10 steps with
    the given step time; ``final`` writes summary.json with the last eval as the final val loss."""
    (directory / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "optimizer": {"name": optimizer, "lr": lr}, "model": {"n_layer": 2}, "train": {}}
    for key, value in (extra_config or {}).items():
        section, name = key.split(".")
        config[section][name] = value
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    last_step = curve[-1][0]
    for step in range(0, last_step + 1, 10):
        seconds = step * ms_per_step / 1e3
        if step:
            records.append(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "time": seconds,
                    "train/loss": 1.0,
                    "train/loss_avg": 1.0,
                    "optim/step_ms": optim_ms,
                    "optim/state_bytes": state_bytes,
                }
            )
        for s, loss in curve:
            if s == step:
                records.append({"step": s, "tokens": s * tokens_per_step, "time": seconds, "val/loss": loss})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final:
        summary = {"final_val_loss": curve[-1][1], "steps": last_step, "optim/state_bytes": state_bytes}
        (directory / "summary.json").write_text(json.dumps(summary))
    return directory


def linear_curve(start: float, slope_per_10: float, steps: int = 100) -> list[tuple[int, float]]:
    return [(s, start - slope_per_10 * s / 10) for s in range(0, steps + 1, 10)]


def read_table(report: str, heading: str | None = None) -> list[dict[str, str]]:
    """The first Markdown table of ``report`` (after ``heading`` if given) as a list of row dicts."""
    lines = report.splitlines()
    start = lines.index(heading) if heading else 0
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("| "))
    header = [c.strip() for c in lines[first].strip("|").split(" | ")]
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip().strip("|").split(" | ")], strict=True)))
    return rows


def compare(*args: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, report.md text or '')."""
    out = Path(args[args.index("--out") + 1])
    status = main(list(args))
    return status, (out / "report.md").read_text() if (out / "report.md").exists() else ""


# --------------------------------------------------------------------------------------------- the rules


def test_crossing_interpolates_or_takes_the_first_eval():
    evals = [Eval(0, 0, 0.0, 5.0), Eval(10, 100, 10.0, 4.0), Eval(20, 200, 30.0, 3.0), Eval(30, 300, 40.0, 2.5)]
    assert crossing(evals, 3.5, "tokens") == pytest.approx(150.0)  # halfway from 4.0 (100) to 3.0 (200)
    assert crossing(evals, 3.5, "time") == pytest.approx(20.0)  # halfway from 10 s to 30 s
    assert crossing(evals, 3.5, "tokens", "first") == 200.0
    assert crossing(evals, 3.5, "time", "first") == 30.0
    assert crossing(evals, 3.0, "tokens") == pytest.approx(200.0)  # exactly on an eval
    assert crossing(evals, 6.0, "tokens") == 0.0  # the first eval is already below
    assert crossing(evals, 2.0, "tokens") is None  # never reached
    diverged = [Eval(0, 0, 0.0, 5.0), Eval(10, 100, 1.0, None), Eval(20, 200, 2.0, 1.0)]
    assert crossing(diverged, 3.0, "tokens") is None  # a NaN before the crossing: the curve is not trusted


def test_speedrun_rule_statistic():
    assert speedrun_margin(3.28, [3.276, 3.277, 3.278, 3.277]) == pytest.approx(0.003 * 2)
    assert speedrun_margin(3.28, [3.279]) == pytest.approx(0.001)


# ---------------------------------------------------------------------------------- a synthetic sweep


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """AdamW and Muon, two LRs x two seeds each (10 tokens and 0.1 s per step), with known crossings of 3.0.

    AdamW's best LR is 2e-3 (finals 3.00, 3.02); Muon's is 0.02 (finals 2.90, 2.92): its LR 0.04 has the lowest
    loss of all on seed 0, but seed 1 diverged (a null loss), so that LR is not eligible.
    """
    root = tmp_path / "sweep"
    write_run(root / "adamw_2e-3_s0", "adamw", 2e-3, 0, [(0, 5.0), (50, 4.0), (90, 3.2), (100, 3.0)])
    write_run(root / "adamw_2e-3_s1", "adamw", 2e-3, 1, [(0, 5.0), (50, 4.0), (90, 3.22), (100, 2.98), (110, 3.02)])
    write_run(root / "adamw_1e-3_s0", "adamw", 1e-3, 0, [(0, 5.0), (100, 3.5)])
    write_run(root / "adamw_1e-3_s1", "adamw", 1e-3, 1, [(0, 5.0), (100, 3.52)])
    for seed, final in ((0, 2.90), (1, 2.92)):
        curve = [(0, 5.0), (40, 3.5), (60, 2.5), (100, final)]
        write_run(root / f"muon_0.02_s{seed}", "muon", 0.02, seed, curve, state_bytes=2**21)
    write_run(root / "muon_0.04_s0", "muon", 0.04, 0, [(0, 5.0), (50, 2.0), (100, 1.5)], state_bytes=2**21)
    diverged = write_run(root / "muon_0.04_s1", "muon", 0.04, 1, [(0, 5.0), (50, 4.0)], final=False)
    with open(diverged / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 60, "tokens": 600, "time": 6.0, "train/loss": None, "train/loss_avg": None}) + "\n")
    return root


def test_report_on_a_synthetic_sweep(sweep: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    status, report = compare(str(sweep), "--target", "3.0", "--out", str(out))
    assert status == 0
    rows = {r["optimizer"]: r for r in read_table(report)}
    adamw, muon = rows["adamw"], rows["muon"]

    assert adamw["best LR"] == "0.002" and muon["best LR"] == "0.02"  # 0.04 has a diverged seed
    assert adamw["final val loss"] == f"3.0100 ± {math.sqrt(0.0002):.4f} (n=2)"
    assert muon["final val loss"] == f"2.9100 ± {math.sqrt(0.0002):.4f} (n=2)"

    # AdamW seed 0 reaches 3.0 exactly at step 100; seed 1 between steps 90 (3.22) and 100 (2.98), at
    # 90 + 10 * 0.22 / 0.24. Muon, both seeds: halfway between 40 (3.5) and 60 (2.5), at step 50.
    adamw_steps = (100 + 90 + 10 * 0.22 / 0.24) / 2
    assert adamw["tokens to target"] == f"{adamw_steps * 10 / 1e3:.1f}k"
    assert adamw["time to target"] == f"{adamw_steps * 0.1:.1f} s"
    assert muon["tokens to target"] == "0.5k" and muon["time to target"] == "5.0 s"
    assert muon["speedup (tokens)"] == f"{adamw_steps / 50:.2f}x"
    assert muon["speedup (time)"] == f"{adamw_steps / 50:.2f}x"
    assert adamw["speedup (tokens)"] == "1.00x"

    assert muon["ms/step"] == "100.0" and muon["optim share"] == "25.0%"
    assert adamw["state"] == "1.0 MiB" and muon["state"] == "2.0 MiB"
    assert adamw["runs"] == "4" and muon["runs"] == "4 (1 diverged)"

    # Speedrun rule: (3.0 - mean) * sqrt(2).
    assert muon["target (speedrun rule)"] == f"meets ({0.09 * math.sqrt(2):+.4f})"
    assert adamw["target (speedrun rule)"] == f"misses ({-0.01 * math.sqrt(2):+.4f})"
    # Welch: t = (2.91 - 3.01) / sqrt(0.0002/2 + 0.0002/2); with 2 degrees of freedom p = 1 - |t| / sqrt(2 + t^2).
    t = -0.1 / math.sqrt(0.0002)
    p = 1 - abs(t) / math.sqrt(2 + t * t)
    assert muon["vs adamw (Welch)"] == f"lower (t={t:+.2f}, p={p:.3f})"
    assert adamw["vs adamw (Welch)"] == "baseline"

    lr_rows = read_table(report, "## LR sensitivity")
    assert [(r["optimizer"], r["LR"]) for r in lr_rows] == [
        ("adamw", "0.001"),
        ("adamw", "0.002 ← best"),
        ("muon", "0.02 ← best"),
        ("muon", "0.04"),
    ]
    assert lr_rows[3]["runs"] == "2 (1 diverged)"
    runs = {r["run"]: r for r in read_table(report, "## Runs")}
    assert len(runs) == 8
    assert runs["muon_0.04_s1"]["status"] == "diverged" and runs["muon_0.04_s1"]["last step"] == "60"
    assert runs["muon_0.04_s1"]["val loss"] == "last eval 4.0000"

    printed = capsys.readouterr().out
    assert "| muon | 0.02 |" in printed and str(out / "report.md") in printed


def test_first_crossing_rule_and_the_default_target(sweep: Path, tmp_path: Path):
    out = tmp_path / "report"
    status, report = compare(str(sweep), "--crossing", "first", "--x", "time", "--out", str(out))
    assert status == 0
    # No --target and no train.target_val_loss: the target is AdamW's mean final loss at its best LR, 3.01.
    assert "Target val loss: **3.0100** (adamw's mean final val loss at its best LR)" in report
    rows = {r["optimizer"]: r for r in read_table(report)}
    # First evals at or below 3.01: AdamW seed 0 at step 100 (3.00), seed 1 at step 100 (2.98); Muon at 60.
    assert rows["adamw"]["tokens to target"] == "1.0k"
    assert rows["muon"]["tokens to target"] == "0.6k"
    assert rows["muon"]["speedup (tokens)"] == f"{100 / 60:.2f}x"
    assert report.index("val_loss_vs_time.png") < report.index("val_loss_vs_tokens.png")  # --x time leads


def test_plots_are_written_with_one_colour_per_optimizer(sweep: Path, tmp_path: Path):
    import matplotlib.image

    out = tmp_path / "report"
    assert compare(str(sweep), "--target", "3.0", "--out", str(out))[0] == 0
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "lr_sensitivity.png"):
        pixels = matplotlib.image.imread(out / name)[..., :3]
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels.std() > 0.05, name  # not a blank canvas
        muon = (abs(pixels * 255 - MUON_RGB) < 8).all(axis=-1).sum()
        assert muon > 50, f"{name}: Muon's colour is missing"


def test_a_partial_line_at_the_end_is_tolerated_and_running_and_stopped_runs_are_marked(tmp_path: Path):
    root = tmp_path / "runs"
    write_run(root / "adamw", "adamw", 1e-3, 0, linear_curve(5.0, 0.1))
    running = write_run(root / "muon_running", "muon", 0.02, 0, linear_curve(5.0, 0.2, 50), final=False)
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "tokens": 6')  # a writer mid-line
    stopped = write_run(root / "soap_stopped", "soap", 3e-3, 0, linear_curve(5.0, 0.2, 50), final=False)
    old = time.time() - 3600
    os.utime(stopped / "metrics.jsonl", (old, old))
    # a stop signal ended this one a moment ago: its metrics are recent, and stopped.json says it is not running
    signalled = write_run(root / "shampoo_signalled", "shampoo", 3e-3, 0, linear_curve(5.0, 0.2, 30), final=False)
    (signalled / "stopped.json").write_text('{"signal": 15, "step": 30}')
    status, report = compare(str(root), "--target", "4.5", "--out", str(tmp_path / "report"))
    assert status == 0
    runs = {r["run"]: r for r in read_table(report, "## Runs")}
    assert runs["muon_running"]["status"] == "running" and runs["muon_running"]["last step"] == "50"
    assert runs["soap_stopped"]["status"] == runs["shampoo_signalled"]["status"] == "stopped"
    rows = {r["optimizer"]: r for r in read_table(report)}
    assert rows["muon"]["best LR"] == "— (no eligible LR)" and rows["muon"]["runs"] == "1 (1 running)"
    assert rows["soap"]["runs"] == "1 (1 stopped)"
    assert "1 done, 0 diverged, 2 stopped, 1 running" in report


def test_runs_that_differ_in_another_key_are_separate_groups(tmp_path: Path, capsys):
    root = tmp_path / "runs"
    for layers in (2, 4):
        for opt, lr in (("adamw", 1e-3), ("muon", 0.02)):
            curve = linear_curve(5.0, 0.1 * layers)
            write_run(root / f"{opt}_{layers}", opt, lr, 0, curve, extra_config={"model.n_layer": layers})
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "several groups match" in error and "adamw (model.n_layer=2)" in error
    status, report = compare(str(root), "--baseline", "adamw (model.n_layer=4)", "--target", "4.0", "--out", str(out))
    assert status == 0
    labels = [r["optimizer"] for r in read_table(report)]
    assert labels[0] == "adamw (model.n_layer=4)"
    assert sorted(labels) == sorted(f"{o} (model.n_layer={n})" for o in ("adamw", "muon") for n in (2, 4))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda run: (run / "summary.json").write_text("{not json"), "summary.json is not valid JSON"),
        (lambda run: (run / "metrics.jsonl").write_text('{"step": 1}\ngarbage\n{"step": 2}\n'), "line 2"),
        (lambda run: (run / ".hydra" / "config.yaml").write_text("a: [1, 2"), "config.yaml is not valid YAML"),
        (lambda run: (run / "metrics.jsonl").unlink() or (run / "metrics.jsonl").mkdir(), "cannot read"),
    ],
)
def test_damaged_files_are_one_line_errors(tmp_path: Path, capsys, damage, fragment):
    run = write_run(tmp_path / "runs" / "adamw", "adamw", 1e-3, 0, linear_curve(5.0, 0.1))
    damage(run)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and fragment in error, error


def test_cli_help_and_bad_paths_in_a_subprocess(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "recipes.compare"]
    proc = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0 and "--baseline" in proc.stdout and "--target" in proc.stdout
    (tmp_path / "empty").mkdir()
    for args, fragment in (
        ([str(tmp_path / "empty")], "no runs found"),
        ([str(tmp_path / "missing")], "is not a directory"),
    ):
        proc = subprocess.run([*run, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and fragment in proc.stderr and proc.stderr.count("\n") == 1


def test_an_unwritable_report_directory_is_a_one_line_error(sweep: Path, tmp_path: Path, capsys):
    (tmp_path / "file").write_text("")
    assert main([str(sweep), "--out", str(tmp_path / "file" / "report")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot write the report to") and error.count("\n") == 1


def test_unknown_baseline_is_a_one_line_error(sweep: Path, tmp_path: Path, capsys):
    assert main([str(sweep), "--baseline", "lion", "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert "--baseline lion: no group matches it" in error and "adamw; muon" in error


# ------------------------------------------------------------------------------------- a real tiny sweep

TINY = [
    *TINY_GPT2,
    *TINY_RUN,
    "train.max_steps=8",
    "train.eval_every=2",
    "train.log_every=2",
    "train.save_model=false",
    "logger.progress=false",
]


def test_real_tiny_sweep(pystdlib_data_root: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    common = [f"data.root={pystdlib_data_root}", *TINY]
    sweep_dir, single = tmp_path / "sweep", tmp_path / "single"
    for args in (
        ["-m", *common, "optimizer=adamw,muon", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"],
        [*common, "optimizer.lr=3e-3", f"hydra.run.dir={single}"],
    ):
        cmd = [sys.executable, str(REPO / "train.py"), *args]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
    runs = sorted(p.parent for p in tmp_path.rglob("summary.json"))
    assert len(runs) == 3
    summaries = {p: json.loads((p / "summary.json").read_text()) for p in runs}
    adamw = {p: s for p, s in summaries.items() if s["optimizer"] == "adamw"}
    (muon_dir,) = [p for p, s in summaries.items() if s["optimizer"] == "muon"]
    target = summaries[muon_dir]["final_val_loss"] + 1e-9

    out = tmp_path / "report"
    status, report = compare(
        str(sweep_dir), str(single), "--target", str(target), "--crossing", "first", "--out", str(out)
    )
    assert status == 0
    rows = {r["optimizer"]: r for r in read_table(report)}
    best_dir = min(adamw, key=lambda p: adamw[p]["final_val_loss"])
    best_lr = 3e-3 if best_dir == single else 1e-3
    assert rows["adamw"]["best LR"] == f"{best_lr:g}"
    assert rows["adamw"]["final val loss"].startswith(f"{adamw[best_dir]['final_val_loss']:.4f} ± 0.0000 (n=1)")
    assert rows["muon"]["runs"] == "1" and rows["adamw"]["runs"] == "2"
    evals = [json.loads(line) for line in (muon_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r["tokens"] for r in evals if "val/loss" in r and r["val/loss"] <= target)
    assert rows["muon"]["tokens to target"] == f"{first / 1e3:.1f}k"
    state = summaries[muon_dir]["optim/state_bytes"]
    assert rows["muon"]["state"] == f"{state / 1024:.1f} KiB" if state < 2**20 else f"{state / 2**20:.1f} MiB"
    assert len(read_table(report, "## LR sensitivity")) == 3
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "lr_sensitivity.png"):
        assert (out / name).stat().st_size > 10_000


def test_best_lr_at_the_end_of_the_grid_is_flagged_and_overlapping_seeds_are_not_significant(tmp_path: Path):
    root = tmp_path / "runs"
    # AdamW: 3 LRs, best in the middle. Muon: 3 LRs, best at the smallest; its seeds overlap AdamW's.
    for lr, final in ((1e-3, 3.3), (2e-3, 3.0), (4e-3, 3.2)):
        for seed, noise in ((0, 0.0), (1, 0.1)):
            write_run(root / f"adamw_{lr}_{seed}", "adamw", lr, seed, [(0, 5.0), (100, final + noise)])
    for lr, final in ((0.01, 2.98), (0.02, 3.1), (0.04, 3.3)):
        for seed, noise in ((0, 0.0), (1, 0.1)):
            write_run(root / f"muon_{lr}_{seed}", "muon", lr, seed, [(0, 5.0), (100, final + noise)])
    status, report = compare(str(root), "--target", "3.5", "--out", str(tmp_path / "report"))
    assert status == 0
    rows = {r["optimizer"]: r for r in read_table(report)}
    assert rows["adamw"]["best LR"] == "0.002" and rows["muon"]["best LR"] == "0.01 (edge)"
    # Welch (variances 0.005, n = 2 a side, so 2 degrees of freedom): t = -0.02 / sqrt(0.005 / 2 + 0.005 / 2).
    t = -0.02 / math.sqrt(0.005)
    p = 1 - abs(t) / math.sqrt(2 + t * t)
    assert rows["muon"]["vs adamw (Welch)"] == f"not significant (t={t:+.2f}, p={p:.3f})"
