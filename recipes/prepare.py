"""Prepare a dataset: documents from a source -> tokenizer -> token shards + ``meta.json``.

Sources (``data.name``):

- ``pystdlib``: the ``.py`` files of the running Python's standard library (``sysconfig``'s ``stdlib`` path,
  without ``site-packages``; tests included), in sorted order, one document per file. A file goes to the
  val split when a stable hash (SHA-256) of its relative path falls below ``val_fraction``. Works offline.
- ``text_files``: local ``.txt`` (one document per file), ``.jsonl`` (one per line, field ``text_field``)
  and ``.parquet`` (one per row, column ``text_field``) files matched by the globs in ``files``.
- ``hf``: any Hugging Face dataset (``hf_path``, ``hf_name``, ``hf_split``, ``text_field``), streamed by default.
- ``fineweb10b``: the NanoGPT speedrun's pre-tokenized FineWeb-10B GPT-2 shards (``hf_path``, by default
  ``kjj0/fineweb10B-gpt2``): a download, no tokenization; ``max_tokens`` rounds up to 100M-token shards.

For ``text_files`` and ``hf`` the split hash is taken over the document's text, so the split does not depend
on file names or order, and duplicated documents land in the same split.

Tokenizers (``data.tokenizer``): ``bpe`` trains a byte-level BPE with the ``tokenizers`` library on the
train split (``vocab_size`` tokens including ``<|endoftext|>``); ``gpt2`` (or ``tiktoken:<encoding>``) uses
tiktoken; anything else is a Hugging Face tokenizer (a local directory or a name in the HF cache) loaded by
``transformers``. The tokenizer is saved in the dataset directory (for ``bpe`` and HF tokenizers,
``AutoTokenizer.from_pretrained(<dataset dir>)`` loads it back). With ``bpe`` the source is read twice (once
to train the tokenizer, once to encode); set ``max_tokens`` for large streams.

:func:`prepare` builds into a hidden temporary directory and renames it when complete, so an interrupted
prepare never leaves a directory that looks like a dataset; on later calls it only checks the dataset.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from recipes.config import DataConfig
from recipes.data import META_FILE, SPLITS, read_meta, read_shard, token_dtype, write_shard
from recipes.errors import ConfigError, DataError

SOURCES = ("pystdlib", "text_files", "hf", "fineweb10b")
EOT_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
CHUNK_CHARS = 1 << 20  # characters per encode_batch call / per worker task: large enough to balance the threads
FINEWEB_SHARD_TOKENS = 100_000_000
FINEWEB_TRAIN_SHARDS = 103

Doc = tuple[str, str]  # (split key, text): the split is decided by a hash of the key


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _first_line(e: BaseException) -> str:
    """An exception as one short line, for messages that must stay on one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def split_of(key: str, val_fraction: float) -> str:
    """``"val"`` for a ``val_fraction`` share of keys, by a stable hash (the same on every machine)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    return "val" if h < val_fraction * 2**64 else "train"


# ---------------------------------------------------------------------------------------------- sources


def stdlib_files() -> tuple[Path, list[str]]:
    """The standard library's directory and its ``.py`` files (posix relative paths, sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]  # never walk into them
        rel = Path(dirpath).relative_to(root)
        files += [(rel / name).as_posix() for name in filenames if name.endswith(".py")]
    return root, sorted(files)


def _files_fingerprint(root: Path, files: list[str]) -> str:
    """A hash of file names and sizes: cheap enough to check at every start, sensitive to a changed corpus."""
    return _sha256("\n".join(f"{name}\t{(root / name).stat().st_size}" for name in files))


class PyStdlibSource:
    """The running Python's standard library sources, one document per file."""

    def __init__(self) -> None:
        self.root, self.files = stdlib_files()
        if not self.files:
            raise DataError(f"no .py files under this Python's stdlib {self.root}; use another data source")

    def count(self) -> int | None:
        return len(self.files)

    def fingerprint(self) -> str:
        return _files_fingerprint(self.root, self.files)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "pystdlib",
            "stdlib": str(self.root),
            "python": platform.python_version(),
            "files": len(self.files),
        }

    def documents(self) -> Iterator[Doc]:
        for name in self.files:
            yield name, (self.root / name).read_bytes().decode("utf-8", errors="replace")


def match_files(patterns: Iterable[str]) -> list[str]:
    """Expand globs (``**`` allowed) into a sorted, de-duplicated list of supported files."""
    files: set[str] = set()
    for pattern in patterns:
        matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DataError(
                f"data.files pattern {pattern!r} matches no file (from {os.getcwd()}); fix the path or glob"
            )
        for path in matched:
            if not path.endswith(TEXT_SUFFIXES):
                raise DataError(f"{path}: unsupported file type; data.files takes {', '.join(TEXT_SUFFIXES)} files")
        files.update(matched)
    return sorted(files)


class TextFilesSource:
    """Local ``.txt`` / ``.jsonl`` / ``.parquet`` files."""

    def __init__(self, patterns: list[str], text_field: str) -> None:
        if not patterns:
            raise DataError(
                "data.files is empty; pass globs of .txt/.jsonl/.parquet files, e.g. data.files='[corpus/*.txt]'"
            )
        self.patterns, self.text_field = list(patterns), text_field
        self.files = match_files(self.patterns)

    def count(self) -> int | None:
        return None

    def fingerprint(self) -> str:
        return _files_fingerprint(Path(), self.files)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "text_files",
            "patterns": self.patterns,
            "files": len(self.files),
            "text_field": self.text_field,
        }

    def _text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {self.text_field!r} is {type(value).__name__}, not text; set data.text_field"
            )
        return value

    def documents(self) -> Iterator[Doc]:
        for path in self.files:
            if path.endswith(".txt"):
                text = Path(path).read_bytes().decode("utf-8", errors="replace")
                yield text, text
            elif path.endswith(".jsonl"):
                yield from self._jsonl(path)
            else:
                yield from self._parquet(path)

    def _jsonl(self, path: str) -> Iterator[Doc]:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e}); fix or remove the line") from None
                if not isinstance(record, dict) or self.text_field not in record:
                    raise DataError(
                        f"{path}:{line_no}: no field {self.text_field!r}; set data.text_field to the text key"
                    )
                text = self._text(record[self.text_field], f"{path}:{line_no}")
                yield text, text

    def _parquet(self, path: str) -> Iterator[Doc]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read parquet ({e}); check the file") from None
        if self.text_field not in table.schema_arrow.names:
            raise DataError(
                f"{path}: no column {self.text_field!r} (columns: {table.schema_arrow.names}); set data.text_field"
            )
        for batch in table.iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    text = self._text(value, path)
                    yield text, text


class HFSource:
    """A Hugging Face dataset, streamed by default (nothing but the read records is downloaded)."""

    def __init__(self, cfg: DataConfig) -> None:
        if not cfg.hf_path:
            raise DataError("data.hf_path is not set; pass data.hf_path=<dataset name or path> (and data.hf_name=...)")
        self.path, self.name, self.split = cfg.hf_path, cfg.hf_name, cfg.hf_split
        self.text_field, self.streaming = cfg.text_field, cfg.streaming

    def count(self) -> int | None:
        return None

    def fingerprint(self) -> None:
        return None  # a remote dataset cannot be checked cheaply; its identity is in the build config

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path, "name": self.name, "split": self.split, "text_field": self.text_field}

    def documents(self) -> Iterator[Doc]:
        import datasets

        try:
            ds = datasets.load_dataset(self.path, self.name, split=self.split, streaming=self.streaming)
        except Exception as e:  # datasets raises many types (missing, offline, bad config)
            raise DataError(
                f"cannot load HF dataset {self.path!r} (config {self.name!r}, split {self.split!r}): "
                f"{_first_line(e)}; check data.hf_path/hf_name/hf_split"
            ) from None
        for i, record in enumerate(ds):
            if self.text_field not in record:
                raise DataError(
                    f"HF dataset {self.path!r} has no field {self.text_field!r} (fields: {sorted(record)}); "
                    "set data.text_field"
                )
            text = record[self.text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"HF dataset {self.path!r} record {i}: {self.text_field!r} is not text; set data.text_field"
                )
            yield text, text


def make_source(cfg: DataConfig) -> PyStdlibSource | TextFilesSource | HFSource:
    if cfg.name == "pystdlib":
        return PyStdlibSource()
    if cfg.name == "text_files":
        return TextFilesSource(list(cfg.files), cfg.text_field)
    if cfg.name == "hf":
        return HFSource(cfg)
    raise ConfigError(f"data.name={cfg.name!r} has no document source; choose one of {', '.join(SOURCES)}")


# ------------------------------------------------------------------------------------------- tokenizers


@dataclasses.dataclass
class Encoder:
    """A tokenizer reduced to what preparing needs: batch encoding without special tokens."""

    kind: str  # bpe | tiktoken | hf
    name: str
    vocab_size: int
    eot_token: int
    encode_batch: Callable[[list[str]], list[list[int]]]
    save: Callable[[str], Any] | None = None  # writes the tokenizer's files into a directory


def tokenizer_spec(cfg: DataConfig) -> dict[str, Any]:
    """How to load the tokenizer ``data.tokenizer`` names (picklable, for worker processes)."""
    name = cfg.tokenizer
    if name == "bpe":
        return {"kind": "bpe", "name": f"bpe{cfg.vocab_size}", "path": None}
    if name == "gpt2" or name.startswith("tiktoken:"):
        return {"kind": "tiktoken", "name": name.removeprefix("tiktoken:"), "path": None}
    return {"kind": "hf", "name": name, "path": None}


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path, *, progress: bool) -> None:
    """Train a byte-level BPE (GPT-2 pre-tokenization, ``<|endoftext|>`` = id 0) and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=progress and sys.stderr.isatty(),  # off a terminal it prints only blank lines
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    # Lets transformers' AutoTokenizer load the dataset directory as a tokenizer.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _load_hf_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub names are "org/name"
    if Path(name).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
    if looks_like_path and not Path(name).expanduser().exists():
        raise DataError(
            f"tokenizer directory {name!r} does not exist; fix data.tokenizer (bpe | gpt2 | HF name or path)"
        )
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # not cached: try the hub
        pass
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # transformers/hub raise many types (offline, missing repo, gated)
        raise DataError(
            f"cannot load tokenizer {name!r} with transformers ({_first_line(e)}); "
            "pass a local tokenizer directory or a cached name, or use data.tokenizer=bpe | gpt2"
        ) from None


def load_encoder(spec: dict[str, Any]) -> Encoder:
    """Build the :class:`Encoder` of a :func:`tokenizer_spec` (``path`` set for a trained ``bpe``)."""
    kind, name = spec["kind"], spec["name"]
    if kind == "bpe":
        from tokenizers import Tokenizer

        bpe = Tokenizer.from_file(spec["path"])
        encode_batch = getattr(bpe, "encode_batch_fast", bpe.encode_batch)  # _fast skips offsets: 2x faster

        def encode_bpe(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in encode_batch(texts, add_special_tokens=False)]

        return Encoder(kind, name, bpe.get_vocab_size(), bpe.token_to_id(EOT_TEXT), encode_bpe)
    if kind == "tiktoken":
        import tiktoken

        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # unknown name, or no network for the one-time download of its ranks
            raise DataError(
                f"cannot load the tiktoken encoding {name!r} ({_first_line(e)}); "
                "it is downloaded once into TIKTOKEN_CACHE_DIR: connect once, or use data.tokenizer=bpe"
            ) from None
        return Encoder(kind, name, enc.n_vocab, enc.eot_token, enc.encode_ordinary_batch)
    tok = _load_hf_tokenizer(name)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {name!r} has no end-of-text (eos) token to separate documents; choose another")
    backend = getattr(tok, "backend_tokenizer", None)
    backend_batch = getattr(backend, "encode_batch_fast", getattr(backend, "encode_batch", None))

    def encode_hf(texts: list[str]) -> list[list[int]]:
        if backend_batch is not None:
            return [e.ids for e in backend_batch(texts, add_special_tokens=False)]
        return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    return Encoder(kind, name, len(tok), tok.eos_token_id, encode_hf, save=tok.save_pretrained)


# ---------------------------------------------------------------------------------- encoding and shards


Encoded = tuple[int, dict[str, tuple[np.ndarray, int]]]  # (documents read, {split: (tokens, documents)})

_WORKER_ENCODER: Encoder | None = None


def _init_worker(spec: dict[str, Any]) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = load_encoder(spec)


def _encode_chunk_in_worker(chunk: list[tuple[str, str]]) -> Encoded:
    assert _WORKER_ENCODER is not None, "worker started without _init_worker"
    return encode_chunk(_WORKER_ENCODER, chunk)


def encode_chunk(encoder: Encoder, chunk: list[tuple[str, str]]) -> Encoded:
    """Encode ``(split, text)`` documents. Returns the number of documents read and, per split, the token
    stream (each non-empty document after an end-of-text token) with its number of documents."""
    ids = encoder.encode_batch([text for _, text in chunk])
    out = {}
    for split in SPLITS:
        docs = [d for (s, _), d in zip(chunk, ids, strict=True) if s == split and d]
        tokens = np.empty(sum(len(d) for d in docs) + len(docs), dtype=np.uint32)
        pos = 0
        for d in docs:
            tokens[pos] = encoder.eot_token
            tokens[pos + 1 : pos + 1 + len(d)] = d
            pos += 1 + len(d)
        out[split] = (tokens, len(docs))
    return len(chunk), out


@contextlib.contextmanager
def _encode_map(
    encoder: Encoder, spec: dict[str, Any], num_proc: int
) -> Iterator[Callable[[Iterable[list[tuple[str, str]]]], Iterator[Encoded]]]:
    """``map`` of :func:`encode_chunk` over chunks, in order: in this process, or in ``num_proc`` workers."""
    if num_proc <= 1:
        yield lambda chunks: (encode_chunk(encoder, c) for c in chunks)
        return

    def ordered(pool: Any, chunks: Iterable[list[tuple[str, str]]]) -> Iterator[Encoded]:
        # Pool.imap would read the whole (possibly endless) stream ahead; keep a bounded window in flight.
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk_in_worker, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    # spawn: a forked child would inherit the tokenizers thread pool (and torch's), which can deadlock.
    with multiprocessing.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=(spec,)) as pool:
        yield lambda chunks: ordered(pool, chunks)


def _chunks(docs: Iterator[Doc], val_fraction: float) -> Iterator[list[tuple[str, str]]]:
    chunk, chars = [], 0
    for key, text in docs:
        chunk.append((split_of(key, val_fraction), text))
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class ShardWriter:
    """Appends the token stream of one split into shards of exactly ``shard_tokens`` (the last one shorter)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self.documents = 0
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        self.tokens += len(tokens)
        self.documents += documents
        while self._pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        if self._pending_tokens:
            self._flush(self._pending_tokens)

    def _flush(self, count: int) -> None:
        stream = np.concatenate(self._pending)
        name = f"{self.split}_{len(self.files):06d}.bin"
        write_shard(self.directory / name, stream[:count], self.dtype)
        self.files.append(name)
        self._pending, self._pending_tokens = [stream[count:]], len(stream) - count

    def summary(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.files}


# ------------------------------------------------------------------------------------------- datasets


def build_config(cfg: DataConfig) -> dict[str, Any]:
    """The settings that determine a dataset's content; a dataset is reused only if they match."""
    keys = ["name", "tokenizer"]
    if cfg.name != "fineweb10b":
        keys += ["val_fraction", "max_tokens"] + (["vocab_size"] if cfg.tokenizer == "bpe" else [])
    keys += {
        "text_files": ["files", "text_field"],
        "hf": ["hf_path", "hf_name", "hf_split", "text_field"],
        "fineweb10b": ["hf_path"],
    }.get(cfg.name, [])
    out = {k: getattr(cfg, k) for k in keys}
    if "files" in out:
        out["files"] = list(out["files"])
    if cfg.name == "fineweb10b":
        out["train_shards"] = _fineweb_train_shards(cfg)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_.") or "_"


def default_dir_name(cfg: DataConfig) -> str:
    """``data.dir_name`` when unset: the source, its identity and the tokenizer, e.g. ``pystdlib-bpe8192``."""
    spec = tokenizer_spec(cfg)
    tok = spec["name"] if spec["kind"] != "hf" else _slug(Path(spec["name"]).name) + "-" + _sha256(spec["name"])[:6]
    if cfg.name == "fineweb10b":
        return f"fineweb10b-gpt2-{_fineweb_train_shards(cfg)}shards"
    if cfg.name == "text_files":
        parts = ["text_files", _sha256(json.dumps(list(cfg.files)))[:8], tok]
    elif cfg.name == "hf":
        parts = [
            "hf",
            _slug(cfg.hf_path or ""),
            *([_slug(cfg.hf_name)] if cfg.hf_name else []),
            _slug(cfg.hf_split),
            tok,
        ]
    else:
        parts = [cfg.name, tok]
    if cfg.max_tokens:
        parts.append(f"max{cfg.max_tokens}")
    return "-".join(parts)


def dataset_dir(cfg: DataConfig) -> Path:
    """Where the dataset of ``cfg`` lives: ``<root>/<dir_name>`` (``root`` relative to the working directory)."""
    return Path(cfg.root).expanduser() / (cfg.dir_name or default_dir_name(cfg))


def check_config(cfg: DataConfig) -> None:
    """Reject bad data settings before any work."""
    if cfg.name not in SOURCES:
        raise ConfigError(f"data.name={cfg.name!r} is unknown; choose one of {', '.join(SOURCES)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        raise ConfigError(f"data.vocab_size={cfg.vocab_size} is too small for a byte-level BPE; use >= 257")
    if not 0 < cfg.shard_tokens < 2**31:
        raise ConfigError(f"data.shard_tokens={cfg.shard_tokens} must be in [1, 2**31)")
    if cfg.max_tokens is not None and cfg.max_tokens <= 0:
        raise ConfigError(f"data.max_tokens={cfg.max_tokens} must be positive or null")
    if cfg.num_proc < 1:
        raise ConfigError(f"data.num_proc={cfg.num_proc} must be >= 1")
    if cfg.name == "fineweb10b" and cfg.tokenizer != "gpt2":
        raise ConfigError(
            "data=fineweb10b ships GPT-2 tokens (data.tokenizer=gpt2); for another tokenizer use data=hf "
            "data.hf_path=HuggingFaceFW/fineweb data.hf_name=sample-10BT"
        )
    if cfg.name == "fineweb10b" and not cfg.hf_path:
        raise ConfigError("data.hf_path is not set; data=fineweb10b downloads from it (kjj0/fineweb10B-gpt2)")


def check_dataset(cfg: DataConfig, directory: Path) -> dict[str, Any]:
    """Check that the prepared ``directory`` can serve ``cfg``; return its meta.

    With a derived directory name, the dataset's build settings must equal ``cfg``'s. With an explicit
    ``data.dir_name`` the dataset is taken as it is (the user named it). Either way a pystdlib dataset must
    come from this Python's stdlib, and a text_files dataset named by ``cfg`` from the files ``cfg`` matches.
    """
    if not (directory / META_FILE).is_file():
        raise DataError(
            f"{directory} exists but is not a prepared dataset (no {META_FILE}); delete it or set data.dir_name"
        )
    meta = read_meta(directory)
    built = meta.get("build", {})
    if cfg.dir_name is None:
        for key, value in build_config(cfg).items():
            if built.get(key) != value:
                raise DataError(
                    f"{directory} was prepared with data.{key}={built.get(key)!r}, not {value!r}; "
                    "delete it to rebuild, or set data.dir_name to another name"
                )
    if built.get("name") == "pystdlib":
        fingerprint, what = PyStdlibSource().fingerprint(), f"this Python's ({platform.python_version()}) stdlib"
    elif built.get("name") == "text_files" and cfg.dir_name is None:
        fingerprint, what = (
            TextFilesSource(list(cfg.files), cfg.text_field).fingerprint(),
            "the files data.files matches",
        )
    else:
        return meta
    if meta["source"].get("fingerprint") != fingerprint:
        raise DataError(
            f"{directory} was prepared from another corpus than {what} (fingerprint "
            f"{str(meta['source'].get('fingerprint'))[:12]} != {fingerprint[:12]}); delete it to rebuild, "
            f"or run `python data/prepare.py {built['name']} ... --force`"
        )
    return meta


def _build_tokenized(cfg: DataConfig, directory: Path, progress: bool) -> dict[str, Any]:
    """Tokenize a document source into ``directory``; return the meta (without build/timing keys)."""
    source = make_source(cfg)
    spec = tokenizer_spec(cfg)
    if spec["kind"] == "bpe":
        spec["path"] = str(directory / "tokenizer.json")
        texts = (text for key, text in source.documents() if text and split_of(key, cfg.val_fraction) == "train")
        if cfg.max_tokens:  # a bounded stream: train the BPE on about the text that will be tokenized
            texts = _take_chars(texts, 10 * cfg.max_tokens)
        train_bpe(texts, cfg.vocab_size, directory / "tokenizer.json", progress=progress)
    encoder = load_encoder(spec)
    if encoder.save is not None:
        encoder.save(str(directory))
    dtype = token_dtype(encoder.vocab_size)
    writers = {split: ShardWriter(directory, split, dtype, cfg.shard_tokens) for split in SPLITS}
    bar = tqdm(
        total=source.count(), unit="doc", desc=f"tokenizing {cfg.name}", disable=not progress, dynamic_ncols=True
    )
    with bar, _encode_map(encoder, spec, cfg.num_proc) as encode_all:
        for read, encoded in encode_all(_chunks(source.documents(), cfg.val_fraction)):
            for split in SPLITS:
                tokens, documents = encoded[split]
                if split == "train" and cfg.max_tokens:
                    tokens = tokens[: cfg.max_tokens - writers["train"].tokens]
                writers[split].add(tokens, documents)
            bar.update(read)
            bar.set_postfix_str(f"{writers['train'].tokens / 1e6:.2f}M train tokens", refresh=False)
            if cfg.max_tokens and writers["train"].tokens >= cfg.max_tokens:
                break
    for writer in writers.values():
        writer.close()
    described = f"data.name={cfg.name} ({json.dumps(source.describe())})"
    if writers["train"].tokens == 0:
        raise DataError(f"empty corpus: {described} yielded no training text; check the source")
    if writers["val"].tokens == 0:
        raise DataError(
            f"no document of {writers['train'].documents} fell in the val split (data.val_fraction={cfg.val_fraction}) "
            f"for {described}; raise data.val_fraction or add documents"
        )
    return {
        "source": {**source.describe(), "fingerprint": source.fingerprint()},
        "tokenizer": {"kind": spec["kind"], "name": encoder.name, "path": "tokenizer.json" if spec["path"] else None},
        "vocab_size": encoder.vocab_size,
        "eot_token": encoder.eot_token,
        "dtype": dtype.name,
        "splits": {split: writer.summary() for split, writer in writers.items()},
    }


def _take_chars(texts: Iterator[str], limit: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= limit:
            return
        total += len(text)
        yield text


def _fineweb_train_shards(cfg: DataConfig) -> int:
    if cfg.max_tokens is None:
        return FINEWEB_TRAIN_SHARDS
    return min(FINEWEB_TRAIN_SHARDS, math.ceil(cfg.max_tokens / FINEWEB_SHARD_TOKENS))


def _build_fineweb10b(cfg: DataConfig, directory: Path, progress: bool) -> dict[str, Any]:
    """Download the speedrun's GPT-2 FineWeb shards: shard 0 is the val split, 1..N the train split."""
    from huggingface_hub import hf_hub_download

    n_train = _fineweb_train_shards(cfg)
    remote = {"val": ["fineweb_val_000000.bin"], "train": [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]}
    splits: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=n_train + 1, unit="shard", desc=f"downloading {cfg.hf_path}", disable=not progress)
    with bar:
        for split, names in remote.items():
            splits[split] = {"tokens": 0, "documents": 0, "shards": []}
            for i, name in enumerate(names):
                try:
                    path = hf_hub_download(cfg.hf_path, name, repo_type="dataset", local_dir=directory)
                except Exception as e:  # offline, missing repo or file
                    raise DataError(
                        f"cannot download {name} from the HF dataset {cfg.hf_path!r} ({type(e).__name__}); "
                        "check the network and data.hf_path"
                    ) from None
                local = f"{split}_{i:06d}.bin"
                os.replace(path, directory / local)
                tokens = read_shard(directory / local)
                if tokens.dtype != np.uint16:
                    raise DataError(
                        f"{name} from {cfg.hf_path!r} holds {tokens.dtype.name} tokens, expected GPT-2 uint16"
                    )
                splits[split]["tokens"] += len(tokens)
                splits[split]["documents"] += int(np.count_nonzero(tokens == 50256))
                splits[split]["shards"].append(local)
                bar.update()
    shutil.rmtree(directory / ".cache", ignore_errors=True)  # hf_hub_download's bookkeeping
    return {
        "source": {
            "kind": "fineweb10b",
            "repo": cfg.hf_path,
            "files": remote["val"] + remote["train"],
            "fingerprint": None,
        },
        "tokenizer": {"kind": "tiktoken", "name": "gpt2", "path": None},
        "vocab_size": 50257,
        "eot_token": 50256,
        "dtype": "uint16",
        "splits": splits,
    }


def _remove_stale_builds(directory: Path) -> None:
    """Delete temporary build directories of ``directory`` left by processes that no longer run."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(cfg: DataConfig, *, progress: bool = True, force: bool = False) -> Path:
    """Return the dataset directory of ``cfg``, building it first if it does not exist.

    Idempotent: an existing dataset is only checked (its build settings, and for pystdlib and text_files the
    corpus fingerprint). A build goes into ``<root>/.<dir_name>.tmp-<pid>`` and is renamed into place when
    complete. ``force`` deletes an existing dataset and builds it again.
    """
    check_config(cfg)
    directory = dataset_dir(cfg)
    if force and directory.exists():
        shutil.rmtree(directory)
    if directory.exists():
        check_dataset(cfg, directory)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(directory)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        start = time.perf_counter()
        build = _build_fineweb10b if cfg.name == "fineweb10b" else _build_tokenized
        meta = {"format": 1, "name": cfg.name, "build": build_config(cfg), **build(cfg, tmp, progress)}
        meta.update(
            python=platform.python_version(),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            prepare_seconds=round(time.perf_counter() - start, 1),
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / META_FILE).is_file():  # not a concurrent prepare (another rank) that finished first
                raise
            check_dataset(cfg, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
