"""Shared fixtures: the real embedded dataset (prepared once per session) and tiny hand-made datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from recipes.config import DataConfig
from recipes.data import write_shard
from recipes.prepare import dataset_dir, prepare


@pytest.fixture(scope="session")
def pystdlib_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the default pystdlib dataset (BPE 8192), prepared once per test session.

    Point a run at it with ``python train.py data.root=<this path>``.
    """
    root = tmp_path_factory.mktemp("data_root")
    prepare(DataConfig(root=str(root)), progress=False)
    return root


@pytest.fixture(scope="session")
def pystdlib_data_dir(pystdlib_data_root: Path) -> Path:
    """The directory of the default pystdlib dataset inside :func:`pystdlib_data_root`."""
    return dataset_dir(DataConfig(root=str(pystdlib_data_root)))


def write_dataset(
    directory: Path,
    train: list[np.ndarray],
    val: list[np.ndarray],
    *,
    vocab_size: int,
    dtype: str = "uint16",
    eot_token: int = 0,
) -> Path:
    """Write a dataset by hand: the given shards and a minimal ``meta.json`` (no tokenizer, no prepare)."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shards in (("train", train), ("val", val)):
        names = []
        for i, tokens in enumerate(shards):
            names.append(f"{split}_{i:06d}.bin")
            write_shard(directory / names[-1], tokens, dtype)
        splits[split] = {"tokens": int(sum(len(s) for s in shards)), "documents": 0, "shards": names}
    meta = {
        "vocab_size": vocab_size,
        "eot_token": eot_token,
        "dtype": dtype,
        "tokenizer": {"kind": "none", "name": "hand-made"},
        "splits": splits,
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(train_shards, val_shards, **meta)``: a hand-written dataset in a fresh directory."""
    count = iter(range(1_000_000))

    def make(train: list[np.ndarray], val: list[np.ndarray], **kwargs) -> Path:
        return write_dataset(tmp_path / f"dataset{next(count)}", train, val, **kwargs)

    return make
