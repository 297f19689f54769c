"""Runs read back from Weights & Biases for ``python -m recipes.compare --wandb SOURCE``.

A SOURCE is either a project or a group on a wandb server, ``entity/project[:group]``, read through the wandb
public API, or a local directory holding offline (or synced) runs, ``.../wandb/offline-run-*/run-<id>.wandb``,
read with wandb's own transaction-log reader (``wandb leet inspect --json``). Either way a run comes back as
the trainer wrote it with ``logger=wandb``: its config, the records of ``metrics.jsonl`` (the same names, see
:mod:`recipes.metrics`) and the values of ``summary.json``, and becomes a :class:`recipes.compare.Run`.

A run that was resumed or requeued logs to the same wandb run id from several processes, and its history holds
the steps between the checkpoint and the stop twice. :func:`replay` keeps what ``metrics.jsonl`` keeps: a record
at step *s* replaces the earlier record of its kind at *s* and drops every earlier record after *s*.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from recipes import metrics
from recipes.compare import RUNNING_WINDOW_S, CompareError, Run, make_run

PROJECT = re.compile(r"^(?P<entity>[\w.-]+)/(?P<project>[\w.-]+)(?::(?P<group>.+))?$")
ENCODED_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # how .wandb files hold them
READER_TIMEOUT_S = 300
API_TIMEOUT_S = 60


def read(source: str, now: float, running_window: float = RUNNING_WINDOW_S, api: Any = None) -> list[Run]:
    """The runs of ``source``: a local directory of wandb runs, or ``entity/project[:group]`` on the server
    (through ``api``, a ``wandb.Api``, made here when not given)."""
    path = Path(source)
    if path.exists():
        return read_offline(path, now, running_window)
    match = PROJECT.match(source)
    if match is None:
        raise CompareError(
            f"--wandb {source}: neither a local directory nor entity/project[:group]; pass a directory holding "
            "wandb runs (e.g. a run directory's wandb/) or a project on the server like my-team/eopt-recipes:sweep1"
        )
    return read_online(match["entity"], match["project"], match["group"], api)


def replay(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` records of a run from its wandb history rows in logging order (wandb's own keys,
    ``_step`` and the like, dropped; encoded non-finite floats decoded), with the steps that a resumed run
    trained again replaced as the trainer's file replaces them."""
    kept: list[dict[str, Any]] = []
    for row in rows:
        record = {k: _decode(v) for k, v in row.items() if not k.startswith("_")}
        if metrics.STEP not in record or metrics.TOKENS not in record:
            continue
        step, is_eval = record[metrics.STEP], _is_eval(record)
        kept = [r for r in kept if r[metrics.STEP] < step or (r[metrics.STEP] == step and _is_eval(r) != is_eval)]
        kept.append(record)
    return kept


def _is_eval(record: dict[str, Any]) -> bool:
    return metrics.VAL_LOSS in record


def _decode(value: Any) -> Any:
    return ENCODED_FLOATS.get(value, value) if isinstance(value, str) else value


def _summary(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _decode(v) for k, v in values.items() if not k.startswith("_")}


def _config(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------- the server


def read_online(entity: str, project: str, group: str | None, api: Any = None) -> list[Run]:
    """Every run of ``entity/project`` (of its ``group`` when given) through the wandb public API."""
    where = f"{entity}/{project}" + (f":{group}" if group else "")
    if api is None:
        if not metrics.wandb_api_key_configured():
            raise CompareError(
                f"--wandb {where}: no wandb API key is configured; set WANDB_API_KEY or run `wandb login`, or pass "
                "a local directory of offline runs instead"
            )
        import wandb

        api = wandb.Api(timeout=API_TIMEOUT_S)
    runs = []
    try:
        found = api.runs(f"{entity}/{project}", filters={"group": group} if group else None)
        for run in tqdm(found, desc=f"wandb {where}", unit="run", disable=None, file=sys.stderr):
            runs.append(
                make_run(
                    run.url,
                    _config(run.config),
                    replay(run.scan_history()),
                    _summary(dict(run.summary.items())),
                    live=run.state == "running",
                    wandb_id=run.id,
                )
            )
    except CompareError:
        raise
    except Exception as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise CompareError(
            f"--wandb {where}: the wandb API failed ({message}); check the entity and project names, the network "
            "and the API key"
        ) from None
    if not runs:
        raise CompareError(f"--wandb {where}: no runs there; check the entity, project and group names")
    return runs


# ------------------------------------------------------------------------------------------ offline files


def read_offline(path: Path, now: float, running_window: float = RUNNING_WINDOW_S) -> list[Run]:
    """Every wandb run under ``path``: the ``run-<id>.wandb`` files of one run id (one per process that logged to
    it, oldest first) make one run. A run whose last file has no exit record is running when the file changed
    within ``running_window`` seconds, else stopped."""
    by_id: dict[str, list[Path]] = {}
    for file in sorted(path.rglob("run-*.wandb"), key=lambda f: f.parent.name):
        by_id.setdefault(file.stem.removeprefix("run-"), []).append(file)
    if not by_id:
        raise CompareError(f"--wandb {path}: no wandb runs under it (looked for */run-<id>.wandb)")
    runs = []
    for run_id, files in tqdm(by_id.items(), desc=f"wandb {path}", unit="run", disable=None, file=sys.stderr):
        tree: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        exited = False
        for file in files:
            records = read_log(file)
            for record in records:
                kind = record.get("type")
                if kind == "run":
                    tree.update(_config(record["run"].get("config", {}).get("update", {})))
                elif kind == "config":
                    tree.update(_config(record["config"].get("update", {})))
                elif kind == "history":
                    rows.append(record["history"]["item"])
                elif kind == "summary":
                    summary.update(_summary(record["summary"].get("update", {})))
            exited = any(r.get("type") == "exit" for r in records)
        if not tree:
            raise CompareError(f"{files[0]} holds no run config: not a run logged by train.py (logger=wandb)")
        live = not exited and now - files[-1].stat().st_mtime < running_window
        runs.append(make_run(files[-1].parent, tree, replay(rows), summary, live=live, wandb_id=run_id))
    return runs


def read_log(file: Path) -> list[dict[str, Any]]:
    """The records of one ``.wandb`` transaction log, as wandb's reader prints them."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(file)]
    started = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=READER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CompareError(f"{file}: wandb's reader did not finish in {time.monotonic() - started:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        records = [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        records = []
    if proc.returncode != 0 or not records:
        reason = " ".join(proc.stderr.split()) or "no records"
        raise CompareError(f"{file} is not a readable wandb run ({reason}): delete it or pass another directory")
    return records
