"""Run outputs: ``metrics.jsonl`` (one JSON object per line), console progress, ``summary.json``."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from recipes.config import LoggerConfig


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


class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl`` and shows progress on the console.

    On resume from step ``resume_step`` the file keeps only records up to that step (the steps after it are
    trained again), so the file always describes one consistent run.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, total_steps: int, resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = cfg.jsonl
        if self.enabled:
            self._truncate_after(resume_step)
            self._file = open(self.path, "a")
        self.interactive = cfg.progress and sys.stderr.isatty()
        self._bar = (
            tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True) if self.interactive else None
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
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._file.flush()

    def advance(self, steps: int = 1, **postfix: float) -> None:
        """Move the progress bar (no-op without a terminal)."""
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def print(self, line: str) -> None:
        """A console line that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.enabled:
            self._file.close()
