"""Structured config schemas, registered with Hydra's ConfigStore, and cross-field validation.

Every config group has a dataclass schema, so a typo or a wrong type fails at composition time with the
key's name. The optimizer group is open (its keys are the chosen optimizer's constructor arguments) and is
checked against ``eopt.OPTIMIZERS`` by :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import recipes.sweep  # noqa: F401  (registers the sweep resolvers on import, see its docstring)


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # gpt2 | llama
    n_layer: int = MISSING
    hidden_size: int = MISSING
    n_head: int = MISSING
    n_kv_head: int | None = None  # llama GQA; None = n_head
    intermediate_size: int | None = None  # MLP width; None = 4 * hidden (gpt2)
    max_position_embeddings: int = 1024
    vocab_size: int | None = None  # None = the tokenizer's
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_from: str | None = None  # a local Hugging Face checkpoint directory to continue from


@dataclass
class DataConfig:
    name: str = "pystdlib"  # pystdlib | fineweb10b | hf | text_files
    root: str = "data"  # prepared datasets live in <root>/<dir_name>; relative to the launch directory
    dir_name: str | None = None  # None = derived from the source and tokenizer
    tokenizer: str = "bpe"  # bpe (train a byte-level BPE on the corpus) | gpt2 (tiktoken) | an HF tokenizer name/path
    vocab_size: int = 8192  # for tokenizer=bpe
    hf_path: str | None = None  # data=hf: dataset name or path
    hf_name: str | None = None  # data=hf: dataset config
    hf_split: str = "train"
    text_field: str = "text"
    streaming: bool = True
    files: list[str] = field(default_factory=list)  # data=text_files: globs of .txt/.jsonl/.parquet
    val_fraction: float = 0.05  # documents routed to the val split (by a stable hash)
    max_tokens: int | None = None  # stop tokenizing after this many train tokens
    shard_tokens: int = 100_000_000
    num_proc: int = 1


@dataclass
class TrainConfig:
    max_steps: int = 300
    max_tokens: int | None = None  # alternative budget: steps = ceil(max_tokens / tokens per step)
    batch_size: int = 16  # global, in sequences
    micro_batch_size: int | None = None  # per rank; null = batch_size / ranks (no accumulation)
    seq_len: int = 256
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_tokens: int = 262_144
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end and on preemption signals
    keep_checkpoints: int = 2
    async_checkpoint: bool = False  # write checkpoints in the background (dcp.async_save) while training goes on
    target_val_loss: float | None = None
    compile: bool = False
    dtype: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    save_model: bool = True  # export the final model with save_pretrained

    def micro_batch(self, data_parallel: int) -> int:
        """Sequences per forward/backward on one of ``data_parallel`` ranks: ``micro_batch_size``, or when it is
        null the rank's whole share of the batch. Gradient accumulation = batch_size / (this x data_parallel)."""
        return self.micro_batch_size or self.batch_size // data_parallel

    @property
    def fresh_batch(self) -> int:
        """Global sequences of the fresh micro-batch of an estimator between steps (Sophia's Hessian), split
        over the ranks: ``micro_batch_size``, or ``batch_size`` when it is null, so the same at any world size."""
        return self.micro_batch_size or self.batch_size


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | wsd | linear | constant
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.1  # final lr / peak lr (cosine, wsd, linear)
    decay_fraction: float = 0.2  # wsd: fraction of the run spent in the final linear decay


@dataclass
class LoggerConfig:
    name: str = "default"  # default (console + metrics.jsonl) | wandb (the same, and Weights & Biases)
    progress: bool = True  # a console progress bar (off when stdout is not a terminal: plain log lines)
    jsonl: bool = True
    # logger=wandb (conf/logger/wandb.yaml); the API key comes from WANDB_API_KEY or `wandb login`, never a config
    mode: str = "online"  # online (offline when no API key is configured) | offline | disabled
    project: str = "eopt-recipes"
    entity: str | None = None  # None = the API key's default entity
    group: str | None = None  # the sweep id in a sweep, so that a sweep's runs are grouped
    run_name: str | None = None  # None = the run directory's name
    tags: list[str] = field(default_factory=list)  # added to optimizer, model, data and parallelism
    init_timeout_s: float = 60.0  # give up reaching the server after this long and log offline instead


@dataclass
class ParallelismConfig:
    name: str = "single"  # single | ddp | fsdp | hsdp (see recipes/parallel.py)
    replicate: int = 1  # hsdp: replica groups (-1 = world / shard)
    shard: int = -1  # fsdp/hsdp: ranks one parameter is sharded over (-1 = the rest of the world)
    reshard_after_forward: bool = True  # FSDP2: free the gathered block after its forward (ZeRO-3); False = ZeRO-2
    mixed_precision: bool = True  # FSDP2 on GPU: bf16 parameters for compute, fp32 gradient reduction
    cpu_offload: bool = False  # FSDP2: parameters, gradients and optimizer state on the host
    matrix_update: str = "owner"  # Muon/SOAP/Shampoo: owner (each matrix once, on one rank) | replicated (every rank)
    timeout_s: int = 600  # collective timeout: a lost rank ends the job after at most this long


@dataclass
class Config:
    seed: int = 1337
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)


def resolve_config(cfg: DictConfig) -> Config:
    """The typed :class:`Config` of a composed Hydra config (the optimizer group stays a plain dict)."""
    config: Config = OmegaConf.to_object(cfg)
    config.optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return config


def register_configs() -> None:
    """Register the schema so that ``conf/train.yaml`` can put it first in its defaults list."""
    ConfigStore.instance().store(name="schema", node=Config)
