"""Run outputs: ``metrics.jsonl`` (one JSON object per line), console progress, ``summary.json``, and
Weights & Biases with ``logger=wandb`` (:class:`WandbSink`: the same records, tokens as the x-axis).

:class:`MetricsLogger` owns the record: it accumulates the loss and gradient norm of every step on the
device, decides the log cadence, reduces over ranks at log time (the train loss is the global mean,
``optim/step_ms`` and ``mem/peak_bytes`` the slowest or largest rank, ``optim/state_bytes`` the largest
rank and ``optim/state_bytes_total`` the sum) and writes only on rank 0. Every rank calls it at the same
steps; the other ranks write nothing.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from recipes import parallel
from recipes.config import LoggerConfig

# The run-file schema, written by the trainer and read by ``recipes.compare``: one place for every name, so the
# writer and the reader cannot drift apart.
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STOPPED_FILE = "stopped.json"  # {"signal", "step"}: a stop signal ended the process; removed when the run goes on
# metrics.jsonl records: every record has STEP, TOKENS (cumulative) and TIME (train seconds, eval excluded);
# train records add the rest, eval records VAL_LOSS.
STEP = "step"
TOKENS = "tokens"
TIME = "time"
TRAIN_LOSS = "train/loss"  # the last step of the window
TRAIN_LOSS_AVG = "train/loss_avg"  # the mean over the window's steps
VAL_LOSS = "val/loss"
GRAD_NORM = "grad_norm"
GRAD_NORM_AVG = "grad_norm_avg"
TOKENS_PER_S = "tokens_per_s"
OPTIM_STEP_MS = "optim/step_ms"  # optimizer.step() of the window's last step, slowest rank
STATE_BYTES = "optim/state_bytes"  # optimizer state on the largest rank
STATE_BYTES_TOTAL = "optim/state_bytes_total"  # summed over ranks
PEAK_BYTES = "mem/peak_bytes"
MFU = "mfu"
# summary.json (also STATE_BYTES, STATE_BYTES_TOTAL, TOKENS)
FINAL_VAL_LOSS = "final_val_loss"
TRAIN_TIME_S = "train_time_s"
STEPS = "steps"
TOKENS_PER_STEP = "tokens_per_step"
TARGET_VAL_LOSS = "target_val_loss"
STEPS_TO_TARGET = "steps_to_target"
TOKENS_TO_TARGET = "tokens_to_target"
TIME_TO_TARGET_S = "time_to_target_s"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"


def wandb_api_key_configured() -> bool:
    """Whether wandb would find an API key: ``WANDB_API_KEY`` or an entry for the host in the netrc file that
    ``wandb login`` writes. Only checked, never read into the run: the key stays where the user put it."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """Sends every record of ``metrics.jsonl`` to a wandb run, and ``summary.json`` as its summary (rank 0 only).

    The run id is kept in ``<run_dir>/wandb_run_id``, so a resumed or requeued run continues the same wandb
    run. ``mode=online`` without a configured API key logs offline, and so does an online run whose server
    cannot be reached; either way one line says how to upload the run with ``wandb sync``. Any other wandb
    failure prints one warning and turns the sink off: training and ``metrics.jsonl`` go on regardless.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], tags: list[str]) -> None:
        self.run = None
        try:
            import wandb
        except ImportError as e:
            self._warn(f"cannot import wandb ({e}): pip install wandb")
            return
        mode = cfg.mode
        if mode == "online" and not wandb_api_key_configured():
            mode = "offline"
            print("wandb: no API key configured (WANDB_API_KEY or `wandb login`): logging offline", file=sys.stderr)
        id_file = run_dir / WANDB_ID_FILE
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(6) + "\n")
        init = {
            "project": cfg.project,
            "entity": cfg.entity,
            "group": cfg.group,
            "name": cfg.run_name or run_dir.name,
            "tags": list(dict.fromkeys(tags + list(cfg.tags))),
            "config": config,
            "id": id_file.read_text().strip(),
            "resume": "allow",
            "dir": str(run_dir),
            "settings": wandb.Settings(init_timeout=cfg.init_timeout_s),
        }
        try:
            self.run = wandb.init(mode=mode, **init)
        except Exception as e:
            if mode != "online":
                self._warn(f"wandb.init failed ({_one_line(e)}): logging to metrics.jsonl only")
                return
            print(f"wandb: cannot reach the server ({_one_line(e)}): logging offline", file=sys.stderr)
            mode = "offline"
            try:
                wandb.teardown()  # the failed online run still holds the run id in this process
                self.run = wandb.init(mode=mode, **init)
            except Exception as e2:
                self._warn(f"wandb.init failed ({_one_line(e2)}): logging to metrics.jsonl only")
                return
        self._call(lambda run: run.define_metric("tokens"))
        self._call(lambda run: run.define_metric("*", step_metric="tokens"))
        if mode == "offline" and self.run is not None:
            print(f"wandb: offline run; upload it with `wandb sync {Path(self.run.dir).parent}`", file=sys.stderr)

    def _warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    def _call(self, action: Callable[[Any], Any]) -> None:
        """``action(run)``; on the first failure warn once and stop using wandb."""
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as e:
            self.run = None
            self._warn(f"wandb failed ({_one_line(e)}): logging to metrics.jsonl only from now on")

    def log(self, record: dict[str, Any]) -> None:
        self._call(lambda run: run.log({k: v for k, v in record.items() if v is not None}))

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary:  # null (a non-finite final loss in summary.json) stays: the run diverged
            self._call(lambda run: run.summary.update(summary))
        self._call(lambda run: run.finish())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl`` and shows progress on the console.

    On resume from step ``resume_step`` the file keeps only records up to that step (the steps after it are
    trained again), so the file always describes one consistent run.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        total_steps: int,
        resume_step: int = 0,
        *,
        log_every: int = 1,
        main: bool = True,
        wandb: WandbSink | None = None,
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self.main = main
        self.wandb = wandb if main else None
        self.enabled = cfg.jsonl and main
        self.log_every = log_every
        if self.enabled:
            self._truncate_after(resume_step)
            self._file = open(self.path, "a")
        self.interactive = cfg.progress and sys.stderr.isatty() and main
        self._bar = (
            tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True) if self.interactive else None
        )
        self._window: torch.Tensor | None = None  # sums of loss and grad norm since the last train record
        self._window_steps = 0
        self._logged_steps = 0
        self._window_start = (0, 0.0)  # (tokens, train time) at the last train record

    def start(self, tokens: int, train_time: float) -> None:
        """Begin the first window of train records at ``(tokens, train_time)`` (0, or the resumed step's)."""
        self._window_start = (tokens, train_time)

    def accumulate(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Add one step's loss and gradient norm (device tensors: no host sync) to the current window."""
        values = torch.stack([loss.detach(), grad_norm.detach().to(loss)])
        self._window = values if self._window is None else self._window + values
        self._window_steps += 1

    def due(self, step: int, force: bool = False) -> bool:
        """Whether a train record is written after ``step``: the cadence, or ``force`` (last step, checkpoint, stop)."""
        return force or step % self.log_every == 0

    def train_record(self, step: int, tokens: int, train_time: float, **values: Any) -> dict[str, Any]:
        """The train record of the window ending at ``step``, reduced over ranks (collective), and a new window.

        ``values``: this rank's ``loss`` (last step) and ``grad_norm`` (global already), ``optim_seconds``,
        ``state_bytes``, ``peak_bytes``, and finished entries (learning rates, optimizer metrics, MFU inputs).
        """
        world = parallel.world_size()
        sums = torch.cat([self._window, values.pop("loss").detach().view(1)]) / world
        loss_sum, _, last_loss = parallel.all_reduce(sums).tolist()
        norm_sum = self._window[1].item()  # the norm is global already
        (total_state,) = parallel.reduced([values["state_bytes"]])
        optim_seconds, peak, state = parallel.reduced(
            [values.pop("optim_seconds"), values.pop("peak_bytes"), values.pop("state_bytes")], "max"
        )
        elapsed = max(train_time - self._window_start[1], 1e-9)
        record = {
            STEP: step,
            TOKENS: tokens,
            TIME: train_time,
            TRAIN_LOSS: last_loss,
            TRAIN_LOSS_AVG: loss_sum / self._window_steps,
            GRAD_NORM: values.pop("grad_norm").item(),
            GRAD_NORM_AVG: norm_sum / self._window_steps,
            TOKENS_PER_S: (tokens - self._window_start[0]) / elapsed,
            OPTIM_STEP_MS: optim_seconds * 1e3,
            STATE_BYTES: int(state),
            STATE_BYTES_TOTAL: int(total_state),
            PEAK_BYTES: int(peak),
            **values,
        }
        self._logged_steps = self._window_steps
        self._window, self._window_steps, self._window_start = None, 0, (tokens, train_time)
        return record

    def write_train(self, record: dict[str, Any]) -> None:
        """Write a :meth:`train_record`, move the progress bar, and print a line when there is no bar (rank 0)."""
        self.log(record)
        self.advance(self._logged_steps, loss=record[TRAIN_LOSS])
        if not self.interactive:
            self.print(
                f"step {record[STEP]:>6} | loss {record[TRAIN_LOSS]:.4f} | {record[TOKENS_PER_S]:,.0f} tok/s | "
                f"optim {record[OPTIM_STEP_MS]:.1f} ms"
            )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed process
            if record.get(STEP, 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to :data:`METRICS_FILE` and send it to wandb (rank 0)."""
        if self.enabled:
            self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._file.flush()
        if self.wandb is not None:
            self.wandb.log(record)  # wandb keeps NaN and Inf: a diverged run reads back as diverged

    def advance(self, steps: int = 1, **postfix: float) -> None:
        """Move the progress bar (no-op without a terminal)."""
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def print(self, line: str) -> None:
        """A console line that does not break the progress bar (rank 0)."""
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Close the outputs; ``summary`` (what ``summary.json`` holds) becomes the wandb run's summary."""
        if self._bar is not None:
            self._bar.close()
        if self.enabled:
            self._file.close()
        if self.wandb is not None:
            self.wandb.finish(summary)
