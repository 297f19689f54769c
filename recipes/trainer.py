"""The training loop: data -> model -> loss.backward over micro-batches -> clip -> optimizer step ->
schedule -> metrics, eval, checkpoint. Train time excludes evaluation and checkpointing.

Each stage is a component that decides for itself: :class:`recipes.parallel.Parallel` builds and wraps the
model, :class:`recipes.metrics.MetricsLogger` owns the record, its cadence and the rank gating,
:class:`recipes.evaluation.Evaluator` owns eval and the target, :class:`recipes.checkpoint.Checkpointer` owns
resume and when to save, and optimizer-specific work goes through ``optimizer.metrics()`` and the between-steps
hook (Sophia's Hessian estimate). Every branch that controls a collective (stop, target, non-finite loss) is
decided on values that are the same on every rank.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoTokenizer

import eopt
from recipes import metrics, parallel
from recipes.checkpoint import Checkpointer
from recipes.config import Config
from recipes.data import TrainBatches, check_vocab_fits, read_meta, val_batches
from recipes.errors import ConfigError, TrainingError
from recipes.evaluation import Evaluator
from recipes.hessian import check_hessian_config, hessian_hook
from recipes.metrics import WANDB_MODES, MetricsLogger, WandbSink, write_json_atomic
from recipes.models import (
    autocast,
    build_model,
    check_model_config,
    count_params,
    cross_entropy,
    flops_per_token,
    peak_flops,
)
from recipes.optim import (
    build_optimizer,
    build_scheduler,
    check_optimizer,
    check_schedule,
    clip_grad_norm_,
    group_learning_rates,
)
from recipes.parallel import Parallel, check_parallelism
from recipes.prepare import prepare

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Plan:
    """What the config resolves to for this run (checked before any work)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    vocab_size: int
    micro_batch_size: int  # per rank
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
    check_parallelism(cfg.parallelism, world_size)
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={t.device!r} must be auto, cpu or cuda")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available: use train.device=cpu (or auto)")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype={t.dtype!r} must be auto, fp32 or bf16")
    for key in ("batch_size", "micro_batch_size", "seq_len", "eval_every", "log_every"):
        if getattr(t, key) is not None and getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be > 0")
    if t.max_steps < 0 or (t.max_tokens is not None and t.max_tokens <= 0):
        raise ConfigError("train.max_steps must be >= 0 and train.max_tokens > 0 (or null)")
    if t.eval_tokens < t.seq_len:
        raise ConfigError(f"train.eval_tokens={t.eval_tokens} must be at least train.seq_len={t.seq_len}")
    if t.checkpoint_every < 0 or t.keep_checkpoints < 1:
        raise ConfigError("train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be > 0, or null to disable clipping")
    if t.micro_batch_size is None and t.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by {world_size} data-parallel ranks: make the "
            f"global batch a multiple of {world_size}"
        )
    if t.micro_batch_size is not None and t.batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size} x "
            f"{world_size} data-parallel rank(s): make the global batch a multiple of {t.micro_batch_size * world_size}"
        )
    if t.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}: "
            "shorten the sequences or pick a model with more positions"
        )
    if t.target_val_loss is not None and t.target_val_loss <= 0:
        raise ConfigError(f"train.target_val_loss={t.target_val_loss} must be > 0, or null")
    if cfg.logger.name not in ("default", "wandb"):
        raise ConfigError(f"logger.name={cfg.logger.name!r} is unknown: use logger=default or logger=wandb")
    if cfg.logger.mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={cfg.logger.mode!r} must be one of {', '.join(WANDB_MODES)}")
    check_model_config(cfg.model)
    check_optimizer(cfg.optimizer, cfg.parallelism.matrix_update)
    check_hessian_config(cfg, world_size)
    check_schedule(cfg.schedule)


def device_kind(cfg: Config) -> str:
    """``cuda`` or ``cpu``, as ``train.device`` says (``auto``: CUDA when there is one)."""
    t = cfg.train
    return "cuda" if t.device == "auto" and torch.cuda.is_available() else t.device.replace("auto", "cpu")


def plan_run(cfg: Config, meta: dict[str, Any], device: torch.device, world_size: int = 1) -> Plan:
    """Resolve dtype, vocabulary, accumulation and budget for a checked config and prepared data on ``device``."""
    t = cfg.train
    dtype = DTYPES[t.dtype] if t.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    vocab_size = cfg.model.vocab_size or meta["vocab_size"]
    check_vocab_fits(meta, vocab_size)
    tokens_per_step = t.batch_size * t.seq_len
    max_steps = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens is not None else t.max_steps
    micro_batch = t.micro_batch(world_size)
    accum_steps = t.batch_size // (micro_batch * world_size)
    amp_dtype = dtype if dtype != torch.float32 else None
    return Plan(device, amp_dtype, vocab_size, micro_batch, accum_steps, tokens_per_step, max_steps)


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


class StopSignal:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 (SLURM preemption, submitit's checkpoint signal) into a flag that every rank
    checks after each step; :meth:`agreed` is the same on every rank, so all save at the same step.

    The handlers that were there before (submitit's, which requeues the job on USR2) come back with
    :meth:`restore`; ``train.py`` then hands the signal on to them once the checkpoint is written.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, device: torch.device) -> None:
        self.signum: int | None = None
        self._flag = torch.zeros(1, device=device)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """Whether any rank was signalled (one tiny all-reduce per step when there are several ranks)."""
        if parallel.world_size() == 1:
            return self.signum is not None
        self._flag.fill_(float(self.signum or 0))
        signum = int(parallel.all_reduce(self._flag, "max").item())
        self.signum = signum or None
        return self.signum is not None


def train_step(model: nn.Module, micro_batches: list, optimizer, plan: Plan, grad_clip: float | None, par: Parallel):
    """Forward/backward over the micro-batches, clip, optimizer step. Returns (loss, grad norm, optimizer seconds).

    The loss of each micro-batch is divided by their number, so the gradient is the mean over this rank's
    sequences, and DDP/FSDP average it over ranks: the mean over the global batch, as in one process.
    """
    loss_sum = torch.zeros((), device=plan.device)
    for i, (inputs, targets) in enumerate(micro_batches):
        with par.no_sync(model, last=i == len(micro_batches) - 1):
            with autocast(plan.device, plan.amp_dtype):
                loss = cross_entropy(
                    model, inputs.to(plan.device, non_blocking=True), targets.to(plan.device, non_blocking=True)
                )
            (loss / len(micro_batches)).backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm_(list(model.parameters()), grad_clip)
    t0 = time.perf_counter()
    optimizer.step()
    optim_seconds = time.perf_counter() - t0
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / len(micro_batches), grad_norm, optim_seconds


def export_model(model: nn.Module, data_dir: Path, out: Path, par: Parallel) -> None:
    """``save_pretrained`` the model (gathered to rank 0 when sharded), with the dataset's tokenizer when it has a
    Hugging Face one, so that any HF tool (generation, lm-eval) loads the directory as it is."""
    state_dict = par.full_state_dict(model)
    if par.world.main:
        model.save_pretrained(out, state_dict=state_dict)
        if (data_dir / "tokenizer_config.json").exists():
            AutoTokenizer.from_pretrained(data_dir).save_pretrained(out)
    parallel.barrier()


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shared_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory, on every rank: Hydra resolves ``${now:...}`` in each process, so ranks started in
    different seconds get different directories. A rank's own directory that holds only Hydra's files goes."""
    shared = Path(parallel.broadcast_object(str(run_dir)))
    if shared != run_dir and run_dir.is_dir():
        if all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
            shutil.rmtree(run_dir)
    return shared


def train(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train as ``cfg`` says, writing metrics, checkpoints and the summary to ``run_dir``.

    Launched by torchrun (or srun) with several processes, every rank calls this; the result is the one
    process's with the same config. Returns the summary, or ``{"stopped": signal, ...}`` after a stop signal.
    """
    try:
        check_config(cfg, parallel.world_from_env().world_size)
    except ConfigError as e:
        raise parallel.on_every_rank(e) from e.__cause__
    par = parallel.init(cfg.parallelism, device_kind(cfg))
    try:
        result = _train(cfg, shared_run_dir(run_dir), par)
        parallel.barrier()  # no rank tears down its connections while another is still in its last collective
        return result
    finally:
        parallel.destroy()


def _train(cfg: Config, run_dir: Path, par: Parallel) -> dict[str, Any]:
    t, world = cfg.train, par.world
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = parallel.decided_once(lambda: prepare(cfg.data, progress=cfg.logger.progress))
    meta = read_meta(data_dir)
    plan = plan_run(cfg, meta, par.device, world.world_size)
    torch.manual_seed(cfg.seed)
    model, forward = par.build(
        lambda: build_model(cfg.model, plan.vocab_size, eot_token=meta["eot_token"]), compile=t.compile
    )
    n_params = count_params(model)
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "optimizer": cfg.optimizer["name"],
        "data": cfg.data.name,
        "parallelism": par.describe(),
        "params": n_params,
        "run_dir": str(run_dir),
    }
    if plan.max_steps == 0:
        if world.main:
            write_json_atomic(run_dir / metrics.SUMMARY_FILE, summary)
        return summary

    optimizer = build_optimizer(
        model, cfg.optimizer, tokens_per_step=plan.tokens_per_step, matrix_update=cfg.parallelism.matrix_update
    )
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.max_steps)
    batches = TrainBatches(
        data_dir,
        seq_len=t.seq_len,
        batch_size=t.batch_size,
        micro_batch_size=plan.micro_batch_size,
        fresh_batch_size=t.fresh_batch,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.seed,
    )
    evaluator = Evaluator(
        par.eval_module(model, forward),
        val_batches(
            data_dir,
            eval_tokens=t.eval_tokens,
            seq_len=t.seq_len,
            micro_batch_size=plan.micro_batch_size,
            rank=world.rank,
            world_size=world.world_size,
        ),
        every=t.eval_every,
        target=t.target_val_loss,
        device=plan.device,
        amp_dtype=plan.amp_dtype,
        seq_len=t.seq_len,
    )
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        t.keep_checkpoints,
        every=t.checkpoint_every,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        fingerprint=fingerprint(cfg),
        async_save=t.async_checkpoint,
    )
    resumed = checkpointer.resume(plan.device)
    state = RunState(**resumed[1]["state"]) if resumed else RunState()
    between_steps = hessian_hook(forward, optimizer, batches, cfg, plan.device, plan.amp_dtype)
    wandb = None
    if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled" and world.main:
        tags = [cfg.optimizer["name"], cfg.model.name, cfg.data.name, cfg.parallelism.name]
        wandb = WandbSink(cfg.logger, run_dir, asdict(cfg), tags)
    log = MetricsLogger(
        run_dir, cfg.logger, plan.max_steps, state.step, log_every=t.log_every, main=world.main, wandb=wandb
    )
    if world.main:
        (run_dir / metrics.STOPPED_FILE).unlink(missing_ok=True)  # the run goes on
    stop = StopSignal(plan.device)
    flops = flops_per_token(model, t.seq_len)
    peak = peak_flops(plan.device, plan.amp_dtype or torch.float32)
    log.print(
        f"{cfg.model.name}: {n_params:,} params | {cfg.optimizer['name']} | {plan.max_steps} steps x "
        f"{plan.tokens_per_step:,} tokens | {plan.device} {str(plan.amp_dtype or torch.float32)[6:]} | "
        f"{par.describe()} | {run_dir}"
    )
    owned = getattr(optimizer, "plan", dict)()
    if owned:
        log.print(
            f"matrix_update=owner: {owned['units']} matrices over {owned['ranks']} ranks, "
            f"busiest rank {owned['balance']:.2f}x the mean matrix-work FLOPs"
        )
    if resumed:
        log.print(f"resumed from {resumed[0].name} (step {state.step})")

    def run_eval() -> float:
        val_loss = evaluator.evaluate()
        log.log(
            {
                metrics.STEP: state.step,
                metrics.TOKENS: state.tokens,
                metrics.TIME: state.train_time,
                metrics.VAL_LOSS: val_loss,
            }
        )
        log.print(f"step {state.step:>6} | val/loss {val_loss:.4f}")
        if state.steps_to_target is None and evaluator.reached(val_loss):
            state.steps_to_target, state.tokens_to_target = state.step, state.tokens
            state.time_to_target = state.train_time
            log.print(f"target val/loss {t.target_val_loss} reached at step {state.step} ({state.tokens:,} tokens)")
        return val_loss

    if state.step >= plan.max_steps or state.steps_to_target is not None:
        stop.restore()
        log.print(f"{run_dir} is already complete (step {state.step}): nothing to do")
        done = run_dir / metrics.SUMMARY_FILE
        summary = parallel.decided_once(lambda: json.loads(done.read_text()) if done.exists() else summary)
        log.close(summary)
        return summary
    val_loss = run_eval() if state.step == 0 else None
    log.start(state.tokens, state.train_time)
    while state.step < plan.max_steps and state.steps_to_target is None:
        step_start = time.perf_counter()
        loss, grad_norm, optim_seconds = train_step(
            forward, batches.micro_batches(state.step), optimizer, plan, t.grad_clip, par
        )
        if between_steps is not None:
            between_steps(state.step)
        lrs = group_learning_rates(optimizer)
        scheduler.step()
        if plan.device.type == "cuda":
            torch.cuda.synchronize(plan.device)
        state.train_time += time.perf_counter() - step_start
        state.step += 1
        state.tokens += plan.tokens_per_step
        log.accumulate(loss, grad_norm)

        last, stopping = state.step == plan.max_steps, stop.agreed()
        if log.due(state.step, force=last or stopping or checkpointer.due(state.step)):
            record = log.train_record(
                state.step,
                state.tokens,
                state.train_time,
                loss=loss,
                grad_norm=grad_norm,
                optim_seconds=optim_seconds,
                state_bytes=eopt.state_bytes(optimizer),
                peak_bytes=peak_memory(plan.device),
                **lrs,
                **{f"optim/{k}": v.item() for k, v in optimizer.metrics().items()},
            )
            if peak is not None:
                record[metrics.MFU] = flops * record[metrics.TOKENS_PER_S] / (peak * world.world_size)
            log.write_train(record)  # a non-finite record too: the run files show where the run diverged
            if not (math.isfinite(record[metrics.TRAIN_LOSS_AVG]) and math.isfinite(record[metrics.GRAD_NORM_AVG])):
                log.close()
                raise parallel.on_every_rank(
                    TrainingError(
                        f"non-finite loss or gradient by step {state.step}: lower optimizer.lr or set "
                        f"train.grad_clip; the checkpoints in {checkpointer.directory} are from before it and intact"
                    )
                )
        if evaluator.due(state.step, last):
            val_loss = run_eval()
        checkpointer.maybe_save(state.step, lambda: asdict(state), stop=stopping)
        if stopping:
            stop.restore()
            log.close()
            if world.main:
                write_json_atomic(run_dir / metrics.STOPPED_FILE, {"signal": stop.signum, "step": state.step})
            return {"stopped": stop.signum, "step": state.step, "checkpoints": str(checkpointer.directory)}

    if val_loss is None:
        val_loss = run_eval()
    checkpointer.maybe_save(state.step, lambda: asdict(state), last=True)
    checkpointer.close()
    stop.restore()
    if t.save_model:
        export_model(model, data_dir, run_dir / "model", par)
    summary.update(
        {
            metrics.FINAL_VAL_LOSS: val_loss,
            metrics.TOKENS: state.tokens,
            metrics.TRAIN_TIME_S: state.train_time,
            metrics.STEPS: state.step,
            metrics.TARGET_VAL_LOSS: t.target_val_loss,
            metrics.TOKENS_TO_TARGET: state.tokens_to_target,
            metrics.TIME_TO_TARGET_S: state.time_to_target,
            metrics.STEPS_TO_TARGET: state.steps_to_target,
            metrics.TOKENS_PER_STEP: plan.tokens_per_step,
        }
    )
    state_bytes = eopt.state_bytes(optimizer)
    summary[metrics.STATE_BYTES] = int(parallel.reduced([state_bytes], "max")[0])
    summary[metrics.STATE_BYTES_TOTAL] = int(parallel.reduced([state_bytes])[0])
    if world.main:
        write_json_atomic(run_dir / metrics.SUMMARY_FILE, summary)
    log.close(summary)
    return summary
