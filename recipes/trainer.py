"""The training loop: data -> model -> loss.backward over micro-batches -> clip -> optimizer step ->
schedule -> metrics, eval, checkpoint. Train time excludes evaluation and checkpointing."""

from __future__ import annotations

import json
import math
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoTokenizer

import eopt
from recipes.checkpoint import Checkpointer
from recipes.config import Config
from recipes.data import TrainBatches, check_vocab_fits, read_meta, val_batches
from recipes.errors import CheckpointError, ConfigError, DataError, TrainingError
from recipes.hessian import hessian_update
from recipes.metrics import MetricsLogger, write_json_atomic
from recipes.models import build_model, check_model_config, count_params, flops_per_token, peak_flops
from recipes.optim import build_optimizer, build_scheduler, check_optimizer, check_schedule, group_learning_rates
from recipes.prepare import prepare

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Plan:
    """What the config resolves to for this run (checked before any work)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    vocab_size: int
    accum_steps: int
    tokens_per_step: int
    max_steps: int


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    steps_to_target: int | None = None
    tokens_to_target: int | None = None
    time_to_target: float | None = None


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Every check that needs only the config, run before any work (data preparation included)."""
    t = cfg.train
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={t.device!r} must be auto, cpu or cuda")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available: use train.device=cpu (or auto)")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype={t.dtype!r} must be auto, fp32 or bf16")
    for key in ("batch_size", "micro_batch_size", "seq_len", "eval_every", "log_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be > 0")
    if t.max_steps < 0 or (t.max_tokens is not None and t.max_tokens <= 0):
        raise ConfigError("train.max_steps must be >= 0 and train.max_tokens > 0 (or null)")
    if t.eval_tokens < t.seq_len:
        raise ConfigError(f"train.eval_tokens={t.eval_tokens} must be at least train.seq_len={t.seq_len}")
    if t.checkpoint_every < 0 or t.keep_checkpoints < 1:
        raise ConfigError("train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be > 0, or null to disable clipping")
    if t.batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size} x "
            f"{world_size} device(s): make the global batch a multiple of {t.micro_batch_size * world_size}"
        )
    if t.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}: "
            "shorten the sequences or pick a model with more positions"
        )
    if t.target_val_loss is not None and t.target_val_loss <= 0:
        raise ConfigError(f"train.target_val_loss={t.target_val_loss} must be > 0, or null")
    check_model_config(cfg.model)
    check_optimizer(cfg.optimizer)
    check_schedule(cfg.schedule)


def plan_run(cfg: Config, meta: dict[str, Any], world_size: int = 1) -> Plan:
    """Resolve device, dtype, vocabulary, accumulation and budget for a checked config and prepared data."""
    t = cfg.train
    device = torch.device(
        "cuda" if t.device == "auto" and torch.cuda.is_available() else t.device.replace("auto", "cpu")
    )
    dtype = DTYPES[t.dtype] if t.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    vocab_size = cfg.model.vocab_size or meta["vocab_size"]
    check_vocab_fits(meta, vocab_size)
    tokens_per_step = t.batch_size * t.seq_len
    max_steps = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens is not None else t.max_steps
    accum_steps = t.batch_size // (t.micro_batch_size * world_size)
    return Plan(device, dtype if dtype != torch.float32 else None, vocab_size, accum_steps, tokens_per_step, max_steps)


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The parts of the config that must not change when a run resumes."""
    c = OmegaConf.to_container(OmegaConf.structured(cfg) if not OmegaConf.is_config(cfg) else cfg, resolve=True)
    train = {k: c["train"][k] for k in ("max_steps", "max_tokens", "batch_size", "seq_len", "grad_clip", "dtype")}
    data = {k: c["data"][k] for k in ("name", "tokenizer", "vocab_size", "hf_path", "hf_name", "files")}
    return {
        "seed": c["seed"],
        "model": c["model"],
        "optimizer": c["optimizer"],
        "data": data,
        "schedule": c["schedule"],
        "train": train,
    }


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]}: checkpoint has {a!r}, this run has {b!r}"


class StopSignal:
    """Turns SIGTERM/SIGUSR1 (SLURM preemption) into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


def cross_entropy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, plan: Plan) -> float:
    """Mean loss over the fixed validation batches."""
    model.eval()
    total = torch.zeros((), device=plan.device)
    for inputs, targets in batches:
        with torch.autocast(plan.device.type, plan.amp_dtype or torch.float32, enabled=plan.amp_dtype is not None):
            total += cross_entropy(model, inputs.to(plan.device), targets.to(plan.device)) * targets.numel()
    model.train()
    return (total / sum(targets.numel() for _, targets in batches)).item()


def train_step(model: nn.Module, micro_batches: list, optimizer, plan: Plan, grad_clip: float | None):
    """Forward/backward over the micro-batches, clip, optimizer step. Returns (loss, grad norm, optimizer seconds)."""
    loss_sum = torch.zeros((), device=plan.device)
    for inputs, targets in micro_batches:
        with torch.autocast(plan.device.type, plan.amp_dtype or torch.float32, enabled=plan.amp_dtype is not None):
            loss = cross_entropy(
                model, inputs.to(plan.device, non_blocking=True), targets.to(plan.device, non_blocking=True)
            )
        (loss / len(micro_batches)).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf, foreach=True)
    t0 = time.perf_counter()
    optimizer.step()
    optim_seconds = time.perf_counter() - t0
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / len(micro_batches), grad_norm, optim_seconds


def estimate_hessian(model: nn.Module, optimizer, batch: tuple, plan: Plan, cfg: Config, step: int) -> None:
    """Sophia's Hessian estimate on a fresh micro-batch, after the step; its sampling is seeded by (seed, step)
    so that a resumed run draws what an uninterrupted one does."""
    inputs, targets = (x.to(plan.device) for x in batch)
    generator = torch.Generator(plan.device).manual_seed(cfg.seed * 1_000_003 + step)
    with torch.autocast(plan.device.type, plan.amp_dtype or torch.float32, enabled=plan.amp_dtype is not None):
        hessian_update(model, optimizer, inputs, targets, grad_clip=cfg.train.grad_clip, generator=generator)


def export_model(model: nn.Module, data_dir: Path, out: Path) -> None:
    """``save_pretrained`` the model, with the dataset's tokenizer when it has a Hugging Face one, so that any HF
    tool (generation, lm-eval) loads the directory as it is."""
    model.save_pretrained(out)
    if (data_dir / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(data_dir).save_pretrained(out)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train as ``cfg`` says, writing metrics, checkpoints and the summary to ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config(cfg)
    data_dir = prepare(cfg.data, progress=cfg.logger.progress)
    meta = read_meta(data_dir)
    plan = plan_run(cfg, meta)
    torch.manual_seed(cfg.seed)
    with plan.device:
        model = build_model(cfg.model, plan.vocab_size, eot_token=meta["eot_token"])
    n_params = count_params(model)
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "optimizer": cfg.optimizer["name"],
        "data": cfg.data.name,
        "params": n_params,
        "run_dir": str(run_dir),
    }
    if plan.max_steps == 0:
        write_json_atomic(run_dir / "summary.json", summary)
        return summary

    optimizer = build_optimizer(model, cfg.optimizer, tokens_per_step=plan.tokens_per_step)
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.max_steps)
    t = cfg.train
    batches = TrainBatches(
        data_dir, seq_len=t.seq_len, batch_size=t.batch_size, micro_batch_size=t.micro_batch_size, seed=cfg.seed
    )
    val = val_batches(data_dir, eval_tokens=t.eval_tokens, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size)
    if not val:
        raise DataError(f"the val split of {data_dir} has fewer than train.seq_len+1 tokens: prepare more data")

    checkpointer = Checkpointer(run_dir / "checkpoints", t.keep_checkpoints)
    state = RunState()
    latest = checkpointer.latest()
    if latest is not None:
        saved = checkpointer.read_trainer_state(latest)
        diff = _first_difference(saved["config"], fingerprint(cfg))
        if diff:
            raise CheckpointError(f"cannot resume from {latest}: {diff}; match the config or use a new run directory")
        checkpointer.load(latest, model, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if plan.device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state = RunState(**saved["state"])

    hessian_interval = cfg.optimizer.get("hessian_interval", 10) if hasattr(optimizer, "update_hessian") else 0
    forward_model = torch.compile(model) if t.compile else model
    log = MetricsLogger(run_dir, cfg.logger, plan.max_steps, state.step)
    stop = StopSignal()
    flops = flops_per_token(model, t.seq_len)
    peak = peak_flops(plan.device, plan.amp_dtype or torch.float32)
    log.print(
        f"{cfg.model.name}: {n_params:,} params | {cfg.optimizer['name']} | {plan.max_steps} steps x "
        f"{plan.tokens_per_step:,} tokens | {plan.device} {str(plan.amp_dtype or torch.float32)[6:]} | {run_dir}"
    )
    if latest is not None:
        log.print(f"resumed from {latest.name} (step {state.step})")

    def save_checkpoint() -> None:
        trainer_state = {
            "state": asdict(state),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "config": fingerprint(cfg),
        }
        if plan.device.type == "cuda":
            trainer_state["cuda_rng"] = torch.cuda.get_rng_state_all()
        checkpointer.save(state.step, model, optimizer, trainer_state)

    def run_eval() -> float:
        val_loss = evaluate(forward_model, val, plan)
        log.log({"step": state.step, "tokens": state.tokens, "time": state.train_time, "val/loss": val_loss})
        log.print(f"step {state.step:>6} | val/loss {val_loss:.4f}")
        if t.target_val_loss is not None and state.steps_to_target is None and val_loss <= t.target_val_loss:
            state.steps_to_target, state.tokens_to_target, state.time_to_target = (
                state.step,
                state.tokens,
                state.train_time,
            )
            log.print(f"target val/loss {t.target_val_loss} reached at step {state.step} ({state.tokens:,} tokens)")
        return val_loss

    if state.step >= plan.max_steps or state.steps_to_target is not None:
        log.print(f"{run_dir} is already complete (step {state.step}): nothing to do")
        log.close()
        done = run_dir / "summary.json"
        return json.loads(done.read_text()) if done.exists() else summary
    val_loss = run_eval() if state.step == 0 else None
    window = torch.zeros(2, device=plan.device)  # sums of loss and grad norm since the last log line
    window_steps, window_start = 0, (state.tokens, state.train_time)
    while state.step < plan.max_steps and state.steps_to_target is None:
        step_start = time.perf_counter()
        loss, grad_norm, optim_seconds = train_step(
            forward_model, batches.micro_batches(state.step), optimizer, plan, t.grad_clip
        )
        if hessian_interval and state.step % hessian_interval == hessian_interval - 1:
            estimate_hessian(forward_model, optimizer, batches.fresh_micro_batch(state.step), plan, cfg, state.step)
        lrs = group_learning_rates(optimizer)
        scheduler.step()
        if plan.device.type == "cuda":
            torch.cuda.synchronize(plan.device)
        state.train_time += time.perf_counter() - step_start
        state.step += 1
        state.tokens += plan.tokens_per_step
        window += torch.stack([loss, grad_norm.to(loss)])
        window_steps += 1

        last = state.step == plan.max_steps
        checkpoint_due = t.checkpoint_every > 0 and state.step % t.checkpoint_every == 0
        if state.step % t.log_every == 0 or last or checkpoint_due or stop.signum is not None:
            loss_sum, norm_sum = window.tolist()
            if not (math.isfinite(loss_sum) and math.isfinite(norm_sum)):
                raise TrainingError(
                    f"non-finite loss or gradient by step {state.step}: lower optimizer.lr or set train.grad_clip; "
                    f"the checkpoints in {checkpointer.directory} are from before it and intact"
                )
            step_loss, norm = loss.item(), grad_norm.item()
            tokens_per_s = (state.tokens - window_start[0]) / max(state.train_time - window_start[1], 1e-9)
            record = {
                "step": state.step,
                "tokens": state.tokens,
                "time": state.train_time,
                "train/loss": step_loss,
                "train/loss_avg": loss_sum / window_steps,
                "grad_norm": norm,
                **lrs,
                "tokens_per_s": tokens_per_s,
                "optim/step_ms": optim_seconds * 1e3,
                "optim/state_bytes": eopt.state_bytes(optimizer),
                "mem/peak_bytes": peak_memory(plan.device),
            }
            if peak is not None:
                record["mfu"] = flops * tokens_per_s / peak
            if getattr(optimizer, "win_rate", None) is not None:
                record["optim/sophia_win_rate"] = optimizer.win_rate.item()
            log.log(record)
            log.advance(window_steps, loss=step_loss)
            if not log.interactive:
                log.print(
                    f"step {state.step:>6} | loss {step_loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                    f"optim {optim_seconds * 1e3:.1f} ms"
                )
            window.zero_()
            window_steps, window_start = 0, (state.tokens, state.train_time)
        if state.step % t.eval_every == 0 or last:
            val_loss = run_eval()
        if stop.signum is not None:
            save_checkpoint()
            log.close()
            raise SystemExit(
                f"stopped by signal {stop.signum} at step {state.step}; checkpoint saved in "
                f"{checkpointer.directory}: run the same command again to resume"
            )
        if checkpoint_due:
            save_checkpoint()

    if val_loss is None:
        val_loss = run_eval()
    save_checkpoint()
    if t.save_model:
        export_model(model, data_dir, run_dir / "model")
    log.close()
    summary.update(
        {
            "final_val_loss": val_loss,
            "tokens": state.tokens,
            "train_time_s": state.train_time,
            "steps": state.step,
            "target_val_loss": t.target_val_loss,
            "tokens_to_target": state.tokens_to_target,
            "time_to_target_s": state.time_to_target,
            "steps_to_target": state.steps_to_target,
            "tokens_per_step": plan.tokens_per_step,
            "optim/state_bytes": eopt.state_bytes(optimizer),
        }
    )
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
