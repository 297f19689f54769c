"""Token shards, the resumable rank-aware batch iterator, and the fixed validation set.

Shard format (modded-nanogpt / llm.c): a header of 256 little-endian int32 -- ``[0]`` the magic 20240520,
``[1]`` the version, ``[2]`` the number of tokens -- then the tokens. Version 1 stores uint16 tokens (the
speedrun's GPT-2 shards); version 2 stores uint32 tokens, for vocabularies larger than 65,536. Documents
are separated by the end-of-text token (each document starts with it, as in the speedrun's shards).

A prepared dataset is a directory holding ``meta.json`` (written last by :mod:`recipes.prepare`), the
tokenizer files, and the shards of its ``train`` and ``val`` splits, listed in order in ``meta.json``.

Training order. The train split is cut into non-overlapping windows of ``seq_len + 1`` tokens at stride
``seq_len`` (a window never crosses a shard boundary). Sample ``g`` of the run is window
``perm_e[g mod W]`` with ``e = g div W``: each epoch walks every window once in its own seeded permutation.
The ``batch_size`` sequences of step ``s`` are samples ``s*batch_size ... (s+1)*batch_size - 1``, so the
batch of any step, mid-epoch included, is a pure function of ``(seed, step, seq_len, batch_size)``: resuming
needs nothing but the step, and the global batch does not depend on the number of ranks. Rank ``r`` of
``R`` takes the ``r``-th contiguous slice of ``batch_size / R`` sequences, cut into micro-batches.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.errors import ConfigError, DataError

SHARD_MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_VERSIONS = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # version -> token dtype
META_FILE = "meta.json"
META_KEYS = ("vocab_size", "eot_token", "dtype", "tokenizer", "splits")
SPLITS = ("train", "val")

# Independent random streams of the training data (mixed into the permutation seed).
_TRAIN_STREAM = 0
_FRESH_STREAM = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds token ids ``0 .. vocab_size - 1``."""
    if vocab_size <= 0:
        raise DataError(f"vocab size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return SHARD_VERSIONS[1]
    if vocab_size <= 2**32:
        return SHARD_VERSIONS[2]
    raise DataError(f"vocab size {vocab_size} does not fit uint32 token shards")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype | str) -> None:
    """Write ``tokens`` as one shard with the header for ``dtype`` (uint16 -> version 1, uint32 -> version 2)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    versions = {d: v for v, d in SHARD_VERSIONS.items()}
    if dtype not in versions:
        raise DataError(f"shard dtype must be uint16 or uint32, got {dtype} (writing {path})")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"a shard holds a 1-D token array, got shape {tokens.shape} (writing {path})")
    if tokens.size >= 2**31:
        raise DataError(f"a shard holds fewer than 2**31 tokens, got {tokens.size} (writing {path})")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise DataError(f"token ids outside the {dtype.name} range (writing {path})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, versions[dtype], tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())


def read_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map the tokens of one shard after checking its header against the file size."""
    path = Path(path)
    fix = "re-create the dataset with `python data/prepare.py ...` (delete its directory first)"
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read token shard {path}: {e.strerror}; {fix}") from None
    if header.size < 3:
        raise DataError(f"token shard {path} is truncated ({size} bytes, shorter than its header); {fix}")
    magic, version, count = (int(x) for x in header[:3])
    if magic != SHARD_MAGIC:
        raise DataError(f"token shard {path} has magic {magic}, expected {SHARD_MAGIC}: not a token shard; {fix}")
    if version not in SHARD_VERSIONS:
        raise DataError(f"token shard {path} has version {version}, expected one of {sorted(SHARD_VERSIONS)}; {fix}")
    dtype = SHARD_VERSIONS[version]
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size != expected:
        raise DataError(
            f"token shard {path} is {size} bytes but its header says {count} {dtype.name} tokens "
            f"({expected} bytes): truncated or corrupt; {fix}"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty range
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``meta.json`` of a prepared dataset.

    Holds at least ``vocab_size``, ``eot_token``, ``dtype`` (``uint16``/``uint32``), ``tokenizer`` (a dict with
    ``kind`` and ``name``) and ``splits`` (``{"train"|"val": {"tokens": int, "documents": int, "shards": [file]}}``).
    """
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(
            f"{Path(data_dir)} is not a prepared dataset (no {META_FILE}); prepare it with "
            "`python data/prepare.py ...` or point data.root / data.dir_name at one"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; delete {Path(data_dir)} and prepare it again") from None
    missing = [k for k in META_KEYS if k not in meta] + [
        f"splits.{s}" for s in SPLITS if s not in meta.get("splits", {})
    ]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; delete {Path(data_dir)} and prepare it again")
    return meta


def check_vocab_fits(meta: Mapping[str, Any], vocab_size: int) -> None:
    """Raise unless a model with ``vocab_size`` embedding rows can take every token id of the dataset."""
    if meta["vocab_size"] > vocab_size:
        raise DataError(
            f"the dataset's tokenizer ({meta['tokenizer'].get('name')}) has {meta['vocab_size']} tokens but "
            f"model.vocab_size={vocab_size}; set model.vocab_size >= {meta['vocab_size']} or leave it unset"
        )


def _split_shards(data_dir: Path, meta: Mapping[str, Any], split: str) -> list[np.ndarray]:
    shards = [read_shard(data_dir / name) for name in meta["splits"][split]["shards"]]
    dtype = np.dtype(meta["dtype"])
    for name, shard in zip(meta["splits"][split]["shards"], shards, strict=True):
        if shard.dtype != dtype:
            raise DataError(
                f"token shard {data_dir / name} holds {shard.dtype.name}, but {META_FILE} says {dtype.name}"
            )
    return shards


def _windows(
    shards: list[np.ndarray], seq_len: int, index: np.ndarray, first: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (int64, ``(len(index), seq_len)``) of global windows ``index``; window ``j`` of
    shard ``i`` (global id ``first[i] + j``) holds tokens ``j*seq_len .. (j+1)*seq_len`` of that shard."""
    shard_of = np.searchsorted(first, index, side="right") - 1
    starts = (index - first[shard_of]) * seq_len
    inputs = np.empty((index.size, seq_len), dtype=np.int64)
    targets = np.empty_like(inputs)
    for row, (s, start) in enumerate(zip(shard_of.tolist(), starts.tolist(), strict=True)):
        window = shards[s][start : start + seq_len + 1]  # one contiguous read per sequence
        inputs[row], targets[row] = window[:-1], window[1:]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class TrainBatches:
    """Deterministic, resumable, rank-aware batches of the train split (see the module docstring).

    Args:
        data_dir: a prepared dataset directory.
        seq_len: tokens per sequence.
        batch_size: sequences per optimizer step, over all ranks.
        micro_batch_size: sequences per forward/backward on one rank.
        fresh_batch_size: global sequences of a :meth:`fresh_micro_batch` (default ``micro_batch_size``).
        rank, world_size: this process's slice of every global batch.
        seed: selects the per-epoch permutations of the windows.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        seq_len: int,
        batch_size: int,
        micro_batch_size: int,
        fresh_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("micro_batch_size", micro_batch_size)):
            if value <= 0:
                raise ConfigError(f"train.{name} must be positive, got {value}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if batch_size % (micro_batch_size * world_size):
            raise ConfigError(
                f"train.batch_size={batch_size} is not divisible by train.micro_batch_size={micro_batch_size} "
                f"x {world_size} ranks; make batch_size a multiple of {micro_batch_size * world_size}"
            )
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.seq_len, self.batch_size, self.micro_batch_size = seq_len, batch_size, micro_batch_size
        self.fresh_batch_size = fresh_batch_size or micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._shards = _split_shards(self.data_dir, self.meta, "train")
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self._shards], dtype=np.int64)
        self.num_windows = int(counts.sum())
        if self.num_windows == 0:
            raise DataError(
                f"the train split of {self.data_dir} has {sum(len(s) for s in self._shards)} tokens, too few "
                f"for one sequence of train.seq_len={seq_len}; lower train.seq_len or prepare more data"
            )
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def tokens_per_step(self) -> int:
        """Training tokens (targets) in one global batch."""
        return self.batch_size * self.seq_len

    def epoch(self, step: int) -> float:
        """Epochs of the train split consumed before optimizer step ``step``."""
        return step * self.batch_size / self.num_windows

    def _permutation(self, stream: int, epoch: int) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed % 2**64, stream, epoch])
            self._perms[key] = rng.permutation(self.num_windows)
            while len(self._perms) > 4:  # a step spans at most two epochs per stream
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return self._perms[key]

    def _samples(self, stream: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of samples ``first .. first + count - 1`` of ``stream``."""
        if first < 0:
            raise ValueError(f"step must be >= 0 (sample {first})")
        samples = np.arange(first, first + count, dtype=np.int64)
        epochs, positions = np.divmod(samples, self.num_windows)
        index = np.empty_like(samples)
        for e in np.unique(epochs):
            mask = epochs == e
            index[mask] = self._permutation(stream, int(e))[positions[mask]]
        return _windows(self._shards, self.seq_len, index, self._first)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches ``(inputs, targets)``, int64 ``(micro_batch_size, seq_len)``, for ``step``."""
        per_rank = self.batch_size // self.world_size
        inputs, targets = self._samples(_TRAIN_STREAM, step * self.batch_size + self.rank * per_rank, per_rank)
        return list(zip(inputs.split(self.micro_batch_size), targets.split(self.micro_batch_size), strict=True))

    def fresh_rows(self) -> range:
        """The positions ``0 .. fresh_batch_size - 1`` of a fresh global micro-batch that this rank holds: the
        ``r``-th contiguous block of ``fresh_batch_size / R``."""
        if self.fresh_batch_size % self.world_size:
            raise ConfigError(
                f"the fresh micro-batch of {self.fresh_batch_size} sequences is not divisible by {self.world_size} "
                f"ranks, so it cannot be split evenly; make train.micro_batch_size a multiple of {self.world_size}"
            )
        share = self.fresh_batch_size // self.world_size
        return range(self.rank * share, (self.rank + 1) * share)

    def fresh_micro_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of one global micro-batch from an independent seeded stream over the train windows.

        For estimators that need a batch the step's gradient did not see (Sophia's Hessian estimate): it never
        shifts the training order. The global micro-batch of ``step`` is samples ``step * fresh_batch_size ..
        (step + 1) * fresh_batch_size - 1`` of that stream, a pure function of ``(seed, step, fresh_batch_size)``
        whatever the number of ranks; rank ``r`` takes the rows :meth:`fresh_rows`.
        """
        rows = self.fresh_rows()
        return self._samples(_FRESH_STREAM, step * self.fresh_batch_size + rows.start, len(rows))


def val_batches(
    data_dir: str | os.PathLike,
    *,
    eval_tokens: int,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first ``eval_tokens // seq_len`` sequences of the val split.

    Sequence ``i`` predicts tokens ``i*seq_len + 1 .. (i+1)*seq_len`` from the ones before, so every run with
    the same ``eval_tokens`` and ``seq_len`` evaluates the same tokens, whatever its batch sizes or ranks.
    Rank ``r`` takes the ``r``-th contiguous block of sequences; the last micro-batch of a rank may be
    smaller, so average losses weighted by ``inputs.shape[0]``. ``eval_tokens <= 0`` gives an empty list.
    """
    if eval_tokens <= 0:
        return []
    if seq_len <= 0 or micro_batch_size <= 0 or not 0 <= rank < world_size:
        raise ConfigError(f"bad val batch shape: seq_len={seq_len} micro_batch_size={micro_batch_size} rank={rank}")
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    n_seq = eval_tokens // seq_len
    if n_seq == 0:
        raise ConfigError(f"train.eval_tokens={eval_tokens} is less than one sequence of {seq_len}; raise it")
    shards = _split_shards(data_dir, meta, "val")
    available = sum(len(s) for s in shards)
    needed = n_seq * seq_len + 1
    if available < needed:
        raise DataError(
            f"the val split of {data_dir} has {available} tokens, fewer than the {needed} that "
            f"train.eval_tokens={eval_tokens} needs; lower train.eval_tokens or prepare with a larger data.val_fraction"
        )
    lo, hi = rank * n_seq // world_size, (rank + 1) * n_seq // world_size
    if hi == lo:
        return []
    tokens, begin, end = [], lo * seq_len, hi * seq_len + 1
    for shard in shards:  # the val stream is the concatenation of its shards
        if begin < len(shard) and end > 0:
            tokens.append(np.asarray(shard[max(begin, 0) : min(end, len(shard))], dtype=np.int64))
        begin, end = begin - len(shard), end - len(shard)
    stream = torch.from_numpy(np.concatenate(tokens))
    inputs, targets = stream[:-1].view(hi - lo, seq_len), stream[1:].view(hi - lo, seq_len)
    return list(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True))
