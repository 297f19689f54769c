"""Shard format, the train batch iterator and the fixed validation set (recipes.data).

Datasets here are hand-made with tokens equal to their position in the split's stream, so every batch
can be checked against where its tokens must come from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recipes.data import (
    HEADER_BYTES,
    TrainBatches,
    check_vocab_fits,
    read_meta,
    read_shard,
    token_dtype,
    val_batches,
    write_shard,
)
from recipes.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize(("dtype", "version", "high"), [("uint16", 1, 2**16), ("uint32", 2, 2**32)])
def test_shard_round_trip_and_header_layout(tmp_path, dtype, version, high):
    tokens = np.random.default_rng(0).integers(0, high, size=1000, dtype=np.int64)
    tokens[:2] = [0, high - 1]  # the extremes of the range
    path = tmp_path / "s.bin"
    write_shard(path, tokens, dtype)
    raw = path.read_bytes()  # the modded-nanogpt layout, read independently of read_shard
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, version, 1000] and not header[3:].any()
    assert len(raw) == 1024 + 1000 * np.dtype(dtype).itemsize
    assert np.array_equal(np.frombuffer(raw[1024:], dtype=np.dtype(dtype).newbyteorder("<")), tokens)
    back = read_shard(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, tokens)


def test_empty_shard_round_trip(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), "uint16")
    assert len(read_shard(tmp_path / "e.bin")) == 0


def test_token_dtype_boundaries():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_write_shard_rejects_tokens_outside_the_dtype(tmp_path):
    with pytest.raises(DataError, match="outside the uint16 range"):
        write_shard(tmp_path / "s.bin", np.array([1, 70000]), "uint16")


def _header(magic=20240520, version=1, count=4):
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, count]
    return header.tobytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_header(magic=12345) + bytes(8), "magic 12345"),
        (_header(version=7) + bytes(8), "version 7"),
        (_header(count=4) + bytes(6), "truncated or corrupt"),  # 3 uint16 tokens where the header says 4
        (_header(count=4) + bytes(10), "truncated or corrupt"),  # trailing bytes
        (_header(version=2, count=4) + bytes(8), "truncated or corrupt"),  # uint32 needs 16 bytes
        (bytes(8), "truncated"),
    ],
)
def test_bad_shard_is_one_line_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad_000001.bin"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_shard_and_meta_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read token shard"):
        read_shard(tmp_path / "nope.bin")
    with pytest.raises(DataError, match="not a prepared dataset"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 5}))
    with pytest.raises(DataError, match="lacks eot_token"):
        read_meta(tmp_path)


def test_corrupt_shard_in_a_dataset_fails_at_loader_start(make_dataset):
    d = make_dataset([np.arange(100)], [np.arange(100)], vocab_size=100)
    with open(d / "train_000000.bin", "r+b") as f:
        f.truncate(HEADER_BYTES + 50)
    with pytest.raises(DataError, match="train_000000.bin"):
        TrainBatches(d, seq_len=8, batch_size=2, micro_batch_size=1)


def test_check_vocab_fits():
    meta = {"vocab_size": 8192, "tokenizer": {"name": "bpe8192"}}
    check_vocab_fits(meta, 8192)
    with pytest.raises(DataError, match="model.vocab_size=4096"):
        check_vocab_fits(meta, 4096)


# ------------------------------------------------------------------------------------------ train batches

# Train stream 0..2299 in two shards; each window of L + 1 tokens starts at a multiple of L inside its shard.
L = 16
SHARD_SIZES = (1000, 1300)


@pytest.fixture
def positional(make_dataset):
    train = [np.arange(0, 1000), np.arange(1000, 2300)]
    return make_dataset(train, [np.arange(5000, 5600), np.arange(5600, 6000)], vocab_size=8000)


def _window_starts():
    starts, offset = [], 0
    for n in SHARD_SIZES:
        starts += [offset + k * L for k in range((n - 1) // L)]
        offset += n
    return starts


def _starts(batches):
    """Window start of each sequence, after checking it is a contiguous run with targets = next tokens."""
    out = []
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == L
        expected = x[:, :1] + torch.arange(L)
        assert torch.equal(x, expected) and torch.equal(y, expected + 1)
        out += x[:, 0].tolist()
    return out


def test_an_epoch_visits_every_window_once_then_reshuffles(positional):
    windows = _window_starts()
    assert len(windows) == 62 + 81
    batches = TrainBatches(positional, seq_len=L, batch_size=11, micro_batch_size=1, seed=3)
    assert batches.num_windows == len(windows)
    epoch0 = [s for step in range(13) for s in _starts(batches.micro_batches(step))]
    assert sorted(epoch0) == windows  # a permutation: every window once, none crosses a shard boundary
    assert epoch0 != windows  # shuffled
    epoch1 = [s for step in range(13, 26) for s in _starts(batches.micro_batches(step))]
    assert sorted(epoch1) == windows and epoch1 != epoch0
    assert batches.epoch(13) == 1.0


def test_a_step_spanning_two_epochs(positional):
    batches = TrainBatches(positional, seq_len=L, batch_size=10, micro_batch_size=5, seed=0)
    first_epoch = [s for step in range(14) for s in _starts(batches.micro_batches(step))]  # samples 0..139
    spanning = _starts(batches.micro_batches(14))  # samples 140..149: three of epoch 0, seven of epoch 1
    assert sorted(first_epoch + spanning[:3]) == _window_starts()
    assert len(set(spanning[3:])) == 7


def test_batches_are_a_pure_function_of_seed_and_step(positional):
    a = TrainBatches(positional, seq_len=L, batch_size=4, micro_batch_size=2, seed=7)
    b = TrainBatches(positional, seq_len=L, batch_size=4, micro_batch_size=2, seed=7)
    late = b.micro_batches(1000)  # resume far into epoch 28 without visiting earlier steps
    for step in range(0, 1001, 50):
        batch = a.micro_batches(step)
    assert all(
        torch.equal(x, y)
        for pair_a, pair_b in zip(batch, late, strict=True)
        for x, y in zip(pair_a, pair_b, strict=True)
    )
    other = TrainBatches(positional, seq_len=L, batch_size=4, micro_batch_size=2, seed=8)
    assert _starts(other.micro_batches(3)) != _starts(a.micro_batches(3))


@pytest.mark.parametrize(("world_size", "micro_batch_size"), [(2, 1), (2, 3), (3, 2), (6, 1)])
def test_ranks_are_disjoint_and_their_union_is_the_global_batch(positional, world_size, micro_batch_size):
    batch_size = 12
    single = TrainBatches(positional, seq_len=L, batch_size=batch_size, micro_batch_size=batch_size, seed=1)
    for step in (0, 5, 23):
        global_batch = _starts(single.micro_batches(step))
        per_rank = []
        for rank in range(world_size):
            ranked = TrainBatches(
                positional,
                seq_len=L,
                batch_size=batch_size,
                micro_batch_size=micro_batch_size,
                rank=rank,
                world_size=world_size,
                seed=1,
            )
            micro = ranked.micro_batches(step)
            assert len(micro) == batch_size // (world_size * micro_batch_size)
            assert all(x.shape == (micro_batch_size, L) for x, _ in micro)
            per_rank.append(_starts(micro))
        assert sum(per_rank, []) == global_batch  # rank r holds the r-th slice, in order
        assert len(set(global_batch)) == batch_size  # disjoint (within an epoch)


def test_fresh_micro_batches_are_an_independent_stream(positional):
    train = TrainBatches(positional, seq_len=L, batch_size=4, micro_batch_size=2, seed=5)
    fresh = [_starts([train.fresh_micro_batch(step)]) for step in range(5)]
    assert fresh != [_starts(train.micro_batches(step)[:1]) for step in range(5)]
    assert fresh == [_starts([train.fresh_micro_batch(step)]) for step in range(5)]
    ranks = [
        TrainBatches(positional, seq_len=L, batch_size=4, micro_batch_size=2, rank=r, world_size=2, seed=5)
        for r in range(2)
    ]
    # The ranks split the one-process micro-batch of the same step: the global one does not grow with ranks.
    both = _starts([ranks[0].fresh_micro_batch(3)]) + _starts([ranks[1].fresh_micro_batch(3)])
    assert both == fresh[3] and len(set(both)) == 2
    odd = TrainBatches(positional, seq_len=L, batch_size=4, micro_batch_size=1, rank=1, world_size=2, seed=5)
    with pytest.raises(ConfigError, match="of 1 sequences is not divisible by 2 ranks"):
        odd.fresh_micro_batch(0)


def test_loader_config_errors(positional, make_dataset):
    with pytest.raises(ConfigError, match="not divisible"):
        TrainBatches(positional, seq_len=L, batch_size=6, micro_batch_size=4)
    with pytest.raises(ConfigError, match="not divisible"):
        TrainBatches(positional, seq_len=L, batch_size=4, micro_batch_size=1, world_size=3, rank=0)
    with pytest.raises(ConfigError, match="seq_len"):
        TrainBatches(positional, seq_len=0, batch_size=4, micro_batch_size=1)
    tiny = make_dataset([np.arange(10)], [np.arange(10)], vocab_size=10)
    with pytest.raises(DataError, match="too few for one sequence"):
        TrainBatches(tiny, seq_len=16, batch_size=1, micro_batch_size=1)


# ------------------------------------------------------------------------------------------- val batches


def _val_starts(batches):
    out = []
    for x, y in batches:
        expected = x[:, :1] + torch.arange(x.shape[1])
        assert x.dtype == torch.int64 and torch.equal(x, expected) and torch.equal(y, expected + 1)
        out += x[:, 0].tolist()
    return out


def test_val_set_is_the_fixed_prefix_of_the_val_split(positional):
    # 40 sequences of 16 = 640 tokens: the stream crosses the val shard boundary at token 600.
    batches = val_batches(positional, eval_tokens=650, seq_len=L, micro_batch_size=8)
    assert _val_starts(batches) == [5000 + 16 * i for i in range(40)]
    assert [x.shape[0] for x, _ in batches] == [8] * 5
    again = val_batches(positional, eval_tokens=650, seq_len=L, micro_batch_size=8)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize(("world_size", "micro_batch_size"), [(1, 3), (2, 5), (3, 4), (7, 1)])
def test_val_set_is_the_same_tokens_for_any_ranks_and_micro_batches(positional, world_size, micro_batch_size):
    ranks = [
        val_batches(
            positional, eval_tokens=640, seq_len=L, micro_batch_size=micro_batch_size, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    assert sum((_val_starts(b) for b in ranks), []) == [5000 + 16 * i for i in range(40)]
    assert all(x.shape[0] <= micro_batch_size for b in ranks for x, _ in b)


def test_val_set_errors(positional):
    assert val_batches(positional, eval_tokens=0, seq_len=L, micro_batch_size=1) == []
    with pytest.raises(DataError, match="lower train.eval_tokens"):
        val_batches(positional, eval_tokens=1000, seq_len=8, micro_batch_size=1)  # val has 1000 tokens, needs 1001
    with pytest.raises(ConfigError, match="less than one sequence"):
        val_batches(positional, eval_tokens=10, seq_len=L, micro_batch_size=1)


def test_uint32_dataset_serves_large_token_ids(make_dataset):
    base = 2**20
    d = make_dataset(
        [np.arange(base, base + 400)], [np.arange(base + 400, base + 500)], vocab_size=2**21, dtype="uint32"
    )
    batches = TrainBatches(d, seq_len=L, batch_size=2, micro_batch_size=2)
    x, y = batches.micro_batches(0)[0]
    assert torch.equal(y, x + 1) and int(x.min()) >= base
    (vx, vy), *_ = val_batches(d, eval_tokens=32, seq_len=L, micro_batch_size=2)
    assert vx[0, 0] == base + 400 and torch.equal(vy, vx + 1)
