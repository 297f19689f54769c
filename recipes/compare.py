"""Speedrun-style comparison of optimizer runs, from their run files or from wandb.

    python -m recipes.compare outputs/cpu_bench --target 4.2 --baseline adamw --out benchmarks/cpu_bench
    python -m recipes.compare --wandb my-team/eopt-recipes:lr-sweep-1

Reads every run directory under the given paths (a directory holding ``.hydra/config.yaml``; its
``metrics.jsonl`` and ``summary.json`` when present) and the runs of each ``--wandb`` source (a project or
group on the server, or local offline runs: :mod:`recipes.wandb_runs`), groups the runs by optimizer and by any
other config key that differs between them, picks each group's best learning rate, and writes ``report.md``
with plots. The rules (written into the report too):

- **Best LR**: the lowest mean final val loss over seeds; an LR at which any seed diverged is not eligible.
- **Tokens (time) to target**: the first eval at or below the target, linearly interpolated in tokens (train
  seconds) from the eval before it (``--crossing interp``), or that eval's own tokens (``--crossing first``,
  the speedrun's rule: an upper bound at the eval cadence). Averaged over the seeds of the best LR; a group in
  which a seed never reaches the target gets none.
- **Speedup**: the baseline's tokens (time) to target divided by the group's.
- **Significance**: the speedrun's rule for the target (``(target - mean) * sqrt(n) >= 0.004`` over n seeds)
  and Welch's two-sided t-test of the final val losses against the baseline's best LR (p < 0.05).

Runs that diverged, stopped early or are still running are listed with their status and never enter the
statistics silently: a group's row counts them, and the runs table names each one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipes import metrics
from recipes.errors import RecipeError

SPEEDRUN_MARGIN = 0.004  # modded-nanogpt: (target - mean) * sqrt(n) >= 0.004 over n seeds
WELCH_ALPHA = 0.05
RUNNING_WINDOW_S = 600  # a run without summary whose metrics changed this recently is still running
# Config keys that never split groups: bookkeeping that does not change what is trained.
IGNORED_KEYS = ("seed", "optimizer.lr", "data.root", "logger.", "train.save_model", "train.checkpoint_every")
IGNORED_KEYS += ("train.keep_checkpoints", "train.async_checkpoint", "train.log_every", "parallelism.timeout_s")
# One colour per optimizer, the same in every plot and every report; unknown names take the leftovers.
COLORS = {
    "adamw": "#4d4d4d",
    "muon": "#d62728",
    "soap": "#1f77b4",
    "shampoo": "#2ca02c",
    "adam_mini": "#ff7f0e",
    "sophia": "#9467bd",
    "adafactor": "#8c564b",
}
SPARE_COLORS = ("#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
LINESTYLES = ("-", "--", ":", "-.")
SKIP_DIRS = {"checkpoints", "model", "wandb", ".hydra"}


class CompareError(RecipeError):
    """Bad input to the compare tool (no runs, an unreadable file, an unknown baseline)."""


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Eval:
    step: int
    tokens: int
    time: float
    loss: float | None  # None: non-finite (JSON null)


@dataclass
class Run:
    """One training run as its files describe it."""

    path: Path | str  # the run directory, or where a wandb run was read from (its URL or offline directory)
    config: dict[str, Any]  # flattened: "optimizer.lr" -> 0.02
    status: str  # done | diverged | stopped | running
    evals: list[Eval]
    last_step: int | None
    final_val_loss: float | None
    ms_per_step: float | None
    optim_ms: float | None
    state_bytes: int | None
    wandb_id: str | None = None  # the wandb run this run logs to (``logger=wandb``), if any

    @property
    def optimizer(self) -> str:
        return str(self.config.get("optimizer.name", "?"))

    @property
    def lr(self) -> float | None:
        lr = self.config.get("optimizer.lr")
        return float(lr) if lr is not None else None

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists stay values (so a list that differs splits groups as one key)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise CompareError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix or delete it") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. Its last line may be cut short by a process still writing or killed
    mid-line and is then left out; a bad line anywhere else means a damaged file and is an error."""
    lines = _read_text(path).splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise CompareError(f"{path} line {i + 1} is not valid JSON: the file is damaged") from None
    return records


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def speed(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(ms per step, optimizer ms per step): medians over the train records' windows, so that the slow first
    steps (allocation, warm-up) do not decide the figure."""
    train = [r for r in records if metrics.TRAIN_LOSS in r and metrics.TIME in r]
    windows, prev_step, prev_time = [], 0, 0.0
    for r in train:
        if r[metrics.STEP] > prev_step:
            windows.append(1e3 * (r[metrics.TIME] - prev_time) / (r[metrics.STEP] - prev_step))
        prev_step, prev_time = r[metrics.STEP], r[metrics.TIME]
    optim = [r[metrics.OPTIM_STEP_MS] for r in train if _finite(r.get(metrics.OPTIM_STEP_MS))]
    return (statistics.median(windows) if windows else None, statistics.median(optim) if optim else None)


def read_run(path: Path, now: float, running_window: float = RUNNING_WINDOW_S) -> Run:
    """Read the run directory ``path`` (it holds ``.hydra/config.yaml``) and decide its status: a run without a
    summary whose ``metrics.jsonl`` changed within ``running_window`` seconds is still running, unless a stop
    signal ended it (``stopped.json``)."""
    config_path = path / ".hydra" / "config.yaml"
    try:
        tree = yaml.safe_load(_read_text(config_path))
    except yaml.YAMLError as e:
        raise CompareError(f"{config_path} is not valid YAML ({type(e).__name__})") from None
    if not isinstance(tree, dict):
        raise CompareError(f"{config_path} is not a Hydra run config (a mapping of groups): fix or delete it")
    metrics_path, summary_path = path / metrics.METRICS_FILE, path / metrics.SUMMARY_FILE
    records = read_records(metrics_path) if metrics_path.exists() else []
    summary = _read_json(summary_path) if summary_path.exists() else {}
    live = (
        metrics_path.exists()
        and now - metrics_path.stat().st_mtime < running_window
        and not (path / metrics.STOPPED_FILE).exists()
    )
    id_path = path / metrics.WANDB_ID_FILE
    wandb_id = _read_text(id_path).strip() if id_path.exists() else None
    return make_run(path, tree, records, summary, live=live, wandb_id=wandb_id)


def make_run(
    source: Path | str,
    tree: dict[str, Any],
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    *,
    live: bool,
    wandb_id: str | None = None,
) -> Run:
    """A :class:`Run` from its config tree, its ``metrics.jsonl`` records and its ``summary.json``, wherever they
    were read from. Status: *diverged* when a loss is not finite, *done* with a finite final val loss, else
    *running* when ``live`` (the run is still writing) or *stopped*."""
    evals = [
        Eval(
            r[metrics.STEP],
            r[metrics.TOKENS],
            r[metrics.TIME],
            r[metrics.VAL_LOSS] if _finite(r[metrics.VAL_LOSS]) else None,
        )
        for r in records
        if metrics.VAL_LOSS in r
    ]
    losses = [r[k] for r in records for k in (metrics.TRAIN_LOSS, metrics.TRAIN_LOSS_AVG, metrics.VAL_LOSS) if k in r]
    final = summary.get(metrics.FINAL_VAL_LOSS)
    if not all(_finite(x) for x in losses) or (metrics.FINAL_VAL_LOSS in summary and not _finite(final)):
        status = "diverged"
    elif _finite(final):
        status = "done"
    elif live:
        status = "running"
    else:
        status = "stopped"
    ms_per_step, optim_ms = speed(records)
    state = summary.get(metrics.STATE_BYTES)
    if state is None:
        state = next((r[metrics.STATE_BYTES] for r in reversed(records) if metrics.STATE_BYTES in r), None)
    return Run(
        path=source,
        config=flatten(tree),
        status=status,
        evals=sorted(evals, key=lambda e: e.tokens),
        last_step=max((r[metrics.STEP] for r in records), default=None),
        final_val_loss=final if status == "done" else None,
        ms_per_step=ms_per_step,
        optim_ms=optim_ms,
        state_bytes=state,
        wandb_id=wandb_id,
    )


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Every run directory at or under ``paths`` (a directory with ``.hydra/config.yaml``), sorted."""
    found: set[Path] = set()
    for path in paths:
        if not path.is_dir():
            raise CompareError(f"{path} is not a directory: pass run or sweep directories")
        for root, dirs, _ in os.walk(path):
            if (Path(root) / ".hydra" / "config.yaml").is_file():
                found.add(Path(root))
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    return sorted(found)


# ------------------------------------------------------------------------------------------------- rules


def crossing(evals: Sequence[Eval], target: float, axis: str, mode: str = "interp") -> float | None:
    """Tokens (``axis="tokens"``) or train seconds (``"time"``) at which the val loss first reaches ``target``.

    ``first``: the first eval at or below the target. ``interp``: the straight line between that eval and the one
    before it meets the target there (the loss curve between two evals is unknown; the line is the least
    assumption). None when no eval reaches the target, or when the curve diverged before it did.
    """
    prev: Eval | None = None
    for e in evals:
        if e.loss is None:
            return None
        if e.loss <= target:
            x = getattr(e, axis)
            if mode == "first" or prev is None:
                return float(x)
            x0 = getattr(prev, axis)
            return x0 + (prev.loss - target) / (prev.loss - e.loss) * (x - x0)
        prev = e
    return None


def speedrun_margin(target: float, losses: Sequence[float]) -> float:
    """The speedrun's statistic ``(target - mean) * sqrt(n)``; a record needs it ``>= 0.004``."""
    return (target - statistics.fmean(losses)) * math.sqrt(len(losses))


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """Welch's two-sided t-test of ``a`` against ``b`` -> (t, p); None when it is undefined (fewer than two
    values on a side, or no spread at all)."""
    from scipy.stats import ttest_ind

    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    result = ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


# -------------------------------------------------------------------------------------------- aggregation


@dataclass
class LRPoint:
    lr: float | None
    runs: list[Run]

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "done"]

    @property
    def finals(self) -> list[float]:
        return [r.final_val_loss for r in self.done]

    @property
    def eligible(self) -> bool:
        return bool(self.done) and not any(r.status == "diverged" for r in self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.finals) if self.finals else None


@dataclass
class Group:
    """The runs of one optimizer (and one value of every other config key that differs)."""

    label: str
    optimizer: str
    runs: list[Run]
    points: list[LRPoint] = field(default_factory=list)
    best: LRPoint | None = None
    color: str = ""
    linestyle: str = "-"

    def __post_init__(self) -> None:
        lrs = sorted({r.lr for r in self.runs}, key=lambda x: (x is None, x or 0.0))
        self.points = [LRPoint(lr, [r for r in self.runs if r.lr == lr]) for lr in lrs]
        eligible = [p for p in self.points if p.eligible]
        self.best = min(eligible, key=lambda p: p.mean) if eligible else None

    @property
    def best_at_edge(self) -> bool:
        """The best LR is the smallest or largest of a grid of 3 or more: the optimum may lie outside it."""
        return len(self.points) >= 3 and (self.best is self.points[0] or self.best is self.points[-1])

    def to_target(self, target: float, axis: str, mode: str) -> tuple[float | None, int, int]:
        """(mean over the best LR's seeds or None unless all reach it, seeds reaching, seeds)."""
        done = self.best.done if self.best else []
        xs = [crossing(r.evals, target, axis, mode) for r in done]
        reached = [x for x in xs if x is not None]
        return (statistics.fmean(reached) if reached and len(reached) == len(xs) else None, len(reached), len(xs))


def _differing(runs: list[Run], keys: Iterable[str]) -> list[str]:
    return sorted(k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1)


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def group_runs(runs: list[Run]) -> list[Group]:
    """One group per optimizer and per value of every other differing key. Keys under ``optimizer.`` split
    only runs of the same optimizer (different optimizers have different hyperparameters by nature)."""
    keys = {k for r in runs for k in r.config if not _ignored(k)}
    shared = _differing(runs, (k for k in keys if not k.startswith("optimizer.")))
    by_optimizer: dict[str, list[Run]] = {}
    for r in runs:
        by_optimizer.setdefault(r.optimizer, []).append(r)
    groups = []
    for name, members in sorted(by_optimizer.items()):
        split = shared + _differing(members, (k for k in keys if k.startswith("optimizer.") and k != "optimizer.name"))
        variants: dict[str, list[Run]] = {}
        for r in members:
            label = ", ".join(f"{k}={_short(r.config.get(k))}" for k in split)
            variants.setdefault(f"{name} ({label})" if label else name, []).append(r)
        for i, (label, variant_runs) in enumerate(sorted(variants.items())):
            groups.append(Group(label, name, variant_runs, linestyle=LINESTYLES[i % len(LINESTYLES)]))
    spare = iter(SPARE_COLORS * len(groups))
    unknown: dict[str, str] = {}
    for g in groups:
        g.color = COLORS.get(g.optimizer) or unknown.setdefault(g.optimizer, next(spare))
    return groups


# ----------------------------------------------------------------------------------------------- the report


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if n < 1024:
        return f"{n:.0f} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def _fmt_tokens(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _status_counts(runs: list[Run]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s != "done")
    return f"{len(runs)}" + (f" ({detail})" if detail else "")


def choose_target(groups: list[Group], baseline: Group, target: float | None) -> tuple[float | None, str]:
    """The target loss and where it came from: ``--target``, the runs' own ``train.target_val_loss`` when they
    agree, else the baseline's final val loss at its best LR ("reach AdamW's final loss with fewer tokens")."""
    if target is not None:
        return target, "--target"
    own = {r.config.get("train.target_val_loss") for g in groups for r in g.runs}
    if len(own) == 1 and None not in own:
        return float(own.pop()), "the runs' train.target_val_loss"
    if baseline.best is not None:
        return baseline.best.mean, f"{baseline.label}'s mean final val loss at its best LR"
    return None, "none (the baseline has no finished run)"


def target_cells(g: Group, baseline: Group, target: float | None, mode: str) -> tuple[dict[str, str], dict]:
    """Tokens and time to the target, the speedups over the baseline, the speedrun rule; and the raw values."""
    if target is None:
        return {"target (speedrun rule)": "no target"}, {"tokens": None, "time": None}
    cells, to = {}, {}
    for axis in ("tokens", "time"):
        value, reached, n = g.to_target(target, axis, mode)
        base = baseline.to_target(target, axis, mode)[0]
        to[axis] = value
        if value is None:
            cells[f"{axis} to target"] = f"not reached ({reached}/{n} seeds)"
        else:
            cells[f"{axis} to target"] = _fmt_tokens(value) if axis == "tokens" else f"{value:.1f} s"
        if value and base is not None:
            cells[f"speedup ({axis})"] = f"{base / value:.2f}x"
    margin = speedrun_margin(target, g.best.finals)
    cells["target (speedrun rule)"] = f"{'meets' if margin >= SPEEDRUN_MARGIN else 'misses'} ({margin:+.4f})"
    return cells, to


def speed_cells(best: LRPoint) -> dict[str, str]:
    """Step time, the optimizer's share of it and its state, over the best LR's finished seeds."""
    ms = [r.ms_per_step for r in best.done if r.ms_per_step is not None]
    optim = [r.optim_ms for r in best.done if r.optim_ms is not None]
    state = [r.state_bytes for r in best.done if r.state_bytes is not None]
    ms_mean = statistics.fmean(ms) if ms else None
    share = statistics.fmean(optim) / ms_mean if optim and ms_mean else None
    return {
        "ms/step": _fmt(ms_mean, ".1f"),
        "optim share": "—" if share is None else f"{100 * share:.1f}%",
        "state": _fmt_bytes(max(state) if state else None),
    }


def welch_cell(g: Group, baseline: Group) -> str:
    if g is baseline:
        return "baseline"
    test = welch(g.best.finals, baseline.best.finals if baseline.best else [])
    if test is None:
        return "untestable (n<2 or no spread)"
    t, p = test
    word = ("lower" if t < 0 else "higher") if p < WELCH_ALPHA else "not significant"
    return f"{word} (t={t:+.2f}, p={p:.3f})"


def build_rows(groups: list[Group], baseline: Group, target: float | None, mode: str, x: str) -> list[dict[str, str]]:
    """The main table's rows: the baseline first, then by tokens (or time, ``x``) to target, then final loss;
    groups with no eligible LR last."""
    keyed = []
    for g in groups:
        cells = {"optimizer": g.label, "runs": _status_counts(g.runs)}
        if g.best is None:
            cells["best LR"] = "— (no eligible LR)"
            keyed.append(((2, math.inf, math.inf), cells))
            continue
        finals = g.best.finals
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        cells["best LR"] = _short(g.best.lr) + (" (edge)" if g.best_at_edge else "")
        cells["final val loss"] = f"{g.best.mean:.4f} ± {std:.4f} (n={len(finals)})"
        more, to = target_cells(g, baseline, target, mode)
        cells.update(more)
        cells.update(speed_cells(g.best))
        cells[f"vs {baseline.label} (Welch)"] = welch_cell(g, baseline)
        primary = to[x] if to[x] is not None else math.inf
        keyed.append(((0 if g is baseline else 1, primary, g.best.mean), cells))
    return [cells for _, cells in sorted(keyed, key=lambda kc: kc[0])]


COLUMNS = [
    "optimizer",
    "best LR",
    "final val loss",
    "tokens to target",
    "time to target",
    "speedup (tokens)",
    "speedup (time)",
    "ms/step",
    "optim share",
    "state",
    "runs",
    "target (speedrun rule)",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(rows: list[dict[str, str]], baseline: Group) -> str:
    header = COLUMNS + [f"vs {baseline.label} (Welch)"]
    return markdown_table(header, [[row.get(c, "—") for c in header] for row in rows])


def lr_table(groups: list[Group]) -> str:
    body = []
    for g in groups:
        for p in g.points:
            finals = p.finals
            loss = (
                "—"
                if not finals
                else f"{p.mean:.4f}" + (f" ± {statistics.stdev(finals):.4f}" if len(finals) > 1 else "")
            )
            mark = " ← best" if p is g.best else ""
            body.append([g.label, _short(p.lr) + mark, loss, _status_counts(p.runs)])
    return markdown_table(["optimizer", "LR", "final val loss", "runs"], body)


def runs_table(runs: list[Run], root: Path | None) -> str:
    body = []
    for r in sorted(runs, key=lambda r: (r.status == "done", r.optimizer, r.lr or 0.0, str(r.seed))):
        last = next((e.loss for e in reversed(r.evals) if e.loss is not None), None)
        loss = _fmt(r.final_val_loss, ".4f") if r.status == "done" else f"last eval {_fmt(last, '.4f')}"
        body.append([_relative(r.path, root), r.optimizer, _short(r.lr), str(r.seed), r.status, str(r.last_step), loss])
    return markdown_table(["run", "optimizer", "LR", "seed", "status", "last step", "val loss"], body)


def _relative(path: Path | str, root: Path | None) -> str:
    if isinstance(path, str) or root is None:
        return str(path)
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------- plots


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use so that
    ``--help`` and input errors stay fast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(groups: list[Group], target: float | None, axis: str, path: Path) -> None:
    """Val loss against tokens or train seconds: every seed of each group's best LR, one colour per group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    tail = []
    for g in groups:
        runs = g.best.runs if g.best else []
        for i, r in enumerate(runs):
            pts = [(getattr(e, axis), e.loss) for e in r.evals if e.loss is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            xs = [x / 1e6 for x in xs] if axis == "tokens" else xs
            label = f"{g.label} (lr {_short(g.best.lr)})" if i == 0 else None
            ax.plot(xs, ys, color=g.color, linestyle=g.linestyle, alpha=0.85, linewidth=1.5, label=label)
            tail += list(ys[len(ys) // 5 :])
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.4g}")
    if tail:  # the first fifth of the run (loss falling from ln(vocab)) would squash the part that matters
        lo, hi = min(tail + ([target] if target else [])), max(tail + ([target] if target else []))
        pad = 0.05 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("tokens (millions)" if axis == "tokens" else "train time (s, eval excluded)")
    ax.set_ylabel("val loss")
    ax.set_title(f"Val loss vs {CURVE_TITLES[axis]} (best LR per optimizer, all seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sensitivity(groups: list[Group], path: Path) -> None:
    """Final val loss against LR per group (mean ± std over seeds); a diverged LR is an ``x`` on the top edge."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    diverged = []
    for g in groups:
        pts = [p for p in g.points if p.lr is not None and p.finals and p.eligible]
        if pts:
            stds = [statistics.stdev(p.finals) if len(p.finals) > 1 else 0.0 for p in pts]
            ax.errorbar(
                [p.lr for p in pts],
                [p.mean for p in pts],
                yerr=stds,
                color=g.color,
                linestyle=g.linestyle,
                marker="o",
                capsize=3,
                label=g.label,
            )
        if g.best is not None and g.best.lr is not None:
            ax.plot([g.best.lr], [g.best.mean], marker="o", markersize=12, fillstyle="none", color=g.color)
        diverged += [(p.lr, g.color) for p in g.points if p.lr is not None and not p.eligible and p.runs]
    ax.set_xscale("log")
    if diverged:
        top = ax.get_ylim()[1]
        for i, (lr, color) in enumerate(diverged):
            ax.plot(
                [lr],
                [top],
                marker="x",
                markersize=9,
                color=color,
                linestyle="none",
                label="diverged / no finished run" if i == 0 else None,
                clip_on=False,
            )
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final val loss")
    ax.set_title("LR sensitivity (circle: best LR)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the CLI


PLOTS = {"tokens": "val_loss_vs_tokens.png", "time": "val_loss_vs_time.png", "lr": "lr_sensitivity.png"}
CURVE_TITLES = {"tokens": "tokens", "time": "train time"}


def report_markdown(
    header: list[str],
    table: str,
    groups: list[Group],
    runs: list[Run],
    base: Group,
    root: Path | None,
    crossing_mode: str,
    x: str,
) -> str:
    """``report.md``: the header lines, the main table, how to read it (the rules), the plots, the LR and run
    tables."""
    crossing_rule = (
        "linear interpolation between the last eval above the target and the first at or below it"
        if crossing_mode == "interp"
        else "the first eval at or below the target (an upper bound at the eval cadence)"
    )
    lines = [
        "# Optimizer comparison",
        "",
        *header,
        "",
        table,
        "",
        "How to read it:",
        "- **best LR**: lowest mean final val loss over seeds; an LR at which any seed diverged is not eligible. "
        "`(edge)`: the best LR is at the end of the grid, so the optimum may lie outside it.",
        "- **final val loss**: mean ± sample std over the best LR's finished seeds.",
        f"- **tokens / time to target**: {crossing_rule}; the mean over the best LR's seeds, or *not reached* "
        "when a seed never gets there. Time is train time (eval excluded).",
        f"- **speedup**: {base.label}'s tokens (time) to target / this row's.",
        "- **ms/step**: median over log windows of train time per step; **optim share**: median "
        "`optimizer.step()` time / ms/step; **state**: optimizer state bytes (largest rank).",
        "- **runs**: every run of the group at any LR, with the ones not finished (diverged, stopped, running) "
        "counted; they never enter the statistics.",
        f"- **target (speedrun rule)**: meets when (target - mean) * sqrt(n) >= {SPEEDRUN_MARGIN} (modded-nanogpt's "
        "record rule); the signed statistic is shown.",
        f"- **vs {base.label} (Welch)**: Welch's two-sided t-test of the final val losses at the best LRs; "
        f"lower/higher when p < {WELCH_ALPHA}.",
        "",
        *(f"![val loss vs {CURVE_TITLES[axis]}]({PLOTS[axis]})" for axis in (x, *({"tokens", "time"} - {x}))),
        f"![LR sensitivity]({PLOTS['lr']})",
        "",
        "## LR sensitivity",
        "",
        lr_table(groups),
        "",
        "## Runs",
        "",
        runs_table(runs, root),
        "",
    ]
    return "\n".join(lines)


def compare(
    paths: Sequence[Path],
    out: Path,
    *,
    wandb: Sequence[str] = (),
    target: float | None = None,
    baseline: str = "adamw",
    x: str = "tokens",
    crossing_mode: str = "interp",
    running_window: float = RUNNING_WINDOW_S,
    wandb_api: Any = None,
) -> str:
    """Read the runs under ``paths`` and from the ``wandb`` sources (see :mod:`recipes.wandb_runs`), write
    ``out/report.md`` and the plots; return the main table. A wandb run that is also read from its run directory
    counts once (the directory's files win)."""
    dirs = find_run_dirs(paths)
    now = time.time()
    runs = [read_run(d, now, running_window) for d in dirs]
    duplicates = 0
    if wandb:
        from recipes import wandb_runs

        local_ids = {r.wandb_id for r in runs if r.wandb_id}
        for source in wandb:
            for run in wandb_runs.read(source, now, running_window, wandb_api):
                if run.wandb_id in local_ids:
                    duplicates += 1
                    continue
                local_ids.add(run.wandb_id)
                runs.append(run)
    if not runs:
        where = ", ".join([*map(str, paths), *(f"wandb {w}" for w in wandb)])
        raise CompareError(f"no runs found under {where} (a run directory holds .hydra/config.yaml)")
    groups = group_runs(runs)
    matches = [g for g in groups if g.label == baseline] or [g for g in groups if g.optimizer == baseline]
    if len(matches) != 1:
        found = "; ".join(g.label for g in groups)
        what = "no group matches it" if not matches else "several groups match it"
        raise CompareError(f"--baseline {baseline}: {what} (groups: {found}); pass one of them")
    base = matches[0]
    target, target_source = choose_target(groups, base, target)
    rows = build_rows(groups, base, target, crossing_mode, x)
    table = main_table(rows, base)

    out.mkdir(parents=True, exist_ok=True)
    plot_curves(groups, target, "tokens", out / PLOTS["tokens"])
    plot_curves(groups, target, "time", out / PLOTS["time"])
    plot_sensitivity(groups, out / PLOTS["lr"])
    root = Path(os.path.commonpath([str(p.resolve()) for p in paths])) if paths else None
    statuses = {s: sum(r.status == s for r in runs) for s in ("done", "diverged", "stopped", "running")}
    target_text = f"{target:.4f}" if target is not None else "none"
    sources = ([f"under `{root}`"] if root else []) + [f"from wandb `{w}`" for w in wandb]
    header = [
        f"{len(runs)} runs {' and '.join(sources)}: " + ", ".join(f"{n} {s}" for s, n in statuses.items()) + ".",
        f"Baseline: **{base.label}**. Target val loss: **{target_text}** ({target_source}).",
    ]
    if duplicates:
        header.append(f"{duplicates} wandb runs were also read from their run directories and count once.")
    (out / "report.md").write_text(report_markdown(header, table, groups, runs, base, root, crossing_mode, x))
    summary = f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in statuses.items() if n)
    return f"{summary}; baseline {base.label}; target {target_text} ({target_source})\n\n{table}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.compare",
        description=(
            "Compare optimizer runs speedrun-style: a Markdown report (best LR, final val loss, tokens and time to "
            "the target, speedups, step time, optimizer share and state, significance) and PNG plots, read from "
            "run files only."
        ),
        epilog=(
            "PATHS are run directories (holding .hydra/config.yaml, metrics.jsonl, summary.json) or any directory "
            "above them, e.g. a Hydra sweep. Examples: python -m recipes.compare outputs/cpu_bench --out "
            "benchmarks/cpu_bench; python -m recipes.compare --wandb my-team/eopt-recipes:lr-sweep-1. Exit status 2 "
            "with one line on bad input."
        ),
    )
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATHS", help="run or sweep directories")
    parser.add_argument(
        "--wandb",
        action="append",
        default=[],
        metavar="SOURCE",
        help="also read runs from wandb: entity/project[:group] on the server (needs an API key), or a local "
        "directory of offline runs (e.g. a sweep's run directories with their wandb/); repeatable",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="target val loss (default: the runs' train.target_val_loss when they agree, else the baseline's mean "
        "final val loss at its best LR)",
    )
    parser.add_argument("--baseline", default="adamw", help="optimizer (or group label) to compare against")
    parser.add_argument(
        "--x", choices=("tokens", "time"), default="tokens", help="axis that orders the rows and leads the plots"
    )
    parser.add_argument(
        "--crossing",
        choices=("interp", "first"),
        default="interp",
        help="tokens/time to target: interpolate between evals, or the first eval at or below the target",
    )
    parser.add_argument(
        "--running-window",
        type=float,
        default=RUNNING_WINDOW_S,
        metavar="SECONDS",
        help="a run with no summary.json whose metrics.jsonl changed within this many seconds counts as running "
        "(else stopped)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="report directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.paths and not args.wandb:
        print("error: nothing to compare: pass run or sweep directories, or --wandb SOURCE", file=sys.stderr)
        return 2
    try:
        table = compare(
            args.paths,
            args.out,
            wandb=args.wandb,
            target=args.target,
            baseline=args.baseline,
            x=args.x,
            crossing_mode=args.crossing,
            running_window=args.running_window,
        )
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reading was checked file by file: this is the report directory
        print(f"error: cannot write the report to {args.out}: {e.strerror or e}; pass another --out", file=sys.stderr)
        return 2
    print(table)
    print(f"\nreport: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
