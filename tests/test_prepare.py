"""Dataset preparation (recipes.prepare) and its CLI (data/prepare.py).

Oracles: documents decoded back from the shards with the tokenizer library itself, splits recomputed from
the documented rule (SHA-256 of the key below ``val_fraction``), the stdlib file list walked independently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import recipes.prepare as prep
from recipes.config import DataConfig
from recipes.data import read_meta, read_shard
from recipes.errors import ConfigError, DataError
from recipes.prepare import dataset_dir, prepare

REPO = Path(__file__).resolve().parents[1]


def in_val(key: str, fraction: float) -> bool:
    """The documented split rule, written out independently."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") < fraction * 2**64


def split_stream(directory: Path, split: str) -> list[np.ndarray]:
    """The documents of a split: the runs of tokens that follow each end-of-text token."""
    meta = read_meta(directory)
    stream = np.concatenate([np.asarray(read_shard(directory / s)) for s in meta["splits"][split]["shards"]])
    assert stream[0] == meta["eot_token"]
    cuts = np.flatnonzero(stream == meta["eot_token"])
    return [stream[a + 1 : b] for a, b in zip(cuts, list(cuts[1:]) + [len(stream)], strict=True)]


def decoded_docs(directory: Path, split: str) -> list[str]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return [tokenizer.decode(doc.tolist()) for doc in split_stream(directory, split)]


# A small corpus in all three local formats. Documents of .txt are files, of .jsonl lines, of .parquet rows.
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu naïve café ☕".split()


def corpus_texts() -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    docs = [f"doc {i}: " + " ".join(rng.choice(WORDS, size=5 + i % 7)) + "\n" for i in range(36)]
    return {"a.txt": docs[:1], "b.txt": docs[1:2], "c.jsonl": docs[2:20], "d.parquet": docs[20:]}


def write_corpus(directory: Path) -> list[str]:
    """Write the corpus; return its documents in source order (files sorted, then records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts()
    for name in ("a.txt", "b.txt"):
        (directory / name).write_text(texts[name][0], encoding="utf-8")
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts["c.jsonl"])]
    (directory / "c.jsonl").write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": texts["d.parquet"] + [None]}), directory / "d.parquet")
    return [t for name in sorted(texts) for t in texts[name]]


def text_files_cfg(tmp_path: Path, **overrides) -> DataConfig:
    corpus = tmp_path / "corpus"
    fields = dict(
        name="text_files",
        root=str(tmp_path / "root"),
        files=[str(corpus / "*.txt"), str(corpus / "*.jsonl"), str(corpus / "*.parquet")],
        tokenizer="bpe",
        vocab_size=300,
        val_fraction=0.3,
        shard_tokens=97,
    )
    return DataConfig(**{**fields, **overrides})


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    docs = write_corpus(tmp_path / "corpus")
    assert any(in_val(d, 0.3) for d in docs) and not all(in_val(d, 0.3) for d in docs)
    return docs


def check_documents(directory: Path, docs: list[str], fraction: float, decode=decoded_docs) -> None:
    meta = read_meta(directory)
    for split, wanted in (("val", True), ("train", False)):
        expected = [d for d in docs if in_val(d, fraction) == wanted]
        assert decode(directory, split) == expected
        assert meta["splits"][split]["documents"] == len(expected)
        lengths = [len(read_shard(directory / s)) for s in meta["splits"][split]["shards"]]
        assert meta["splits"][split]["tokens"] == sum(lengths)
        assert all(n == 97 for n in lengths[:-1]) and 0 < lengths[-1] <= 97  # full shards, then the rest


# ----------------------------------------------------------------------------------------------- sources


def test_text_files_txt_jsonl_parquet_with_bpe(tmp_path, corpus):
    from tokenizers import Tokenizer

    directory = prepare(text_files_cfg(tmp_path), progress=False)
    assert directory.parent == tmp_path / "root" and directory.name.startswith("text_files-")
    check_documents(directory, corpus, 0.3)
    meta = read_meta(directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert meta["vocab_size"] == tokenizer.get_vocab_size() <= 300 and meta["dtype"] == "uint16"
    assert meta["eot_token"] == tokenizer.token_to_id("<|endoftext|>")
    assert meta["tokenizer"] == {"kind": "bpe", "name": "bpe300", "path": "tokenizer.json"}
    assert meta["source"]["files"] == 4 and len(meta["source"]["fingerprint"]) == 64
    assert not list((tmp_path / "root").glob(".*"))  # no temporary directory left


def test_multi_process_tokenization(tmp_path, corpus):
    directory = prepare(text_files_cfg(tmp_path, num_proc=2), progress=False)
    check_documents(directory, corpus, 0.3)


@pytest.mark.parametrize(("first_word_id", "dtype"), [(2, "uint16"), (70_000, "uint32")])
def test_hf_tokenizer_from_a_local_directory(tmp_path, corpus, first_word_id, dtype):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = sorted(set(" ".join(corpus).split()))
    filler = {f"<unused{i}>": i for i in range(2, first_word_id)}  # pushes the ids past uint16 when large
    vocab = {"[UNK]": 0, "<eos>": 1, **filler, **{w: first_word_id + i for i, w in enumerate(words)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>", unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    oracle = AutoTokenizer.from_pretrained(tmp_path / "tok")

    directory = prepare(text_files_cfg(tmp_path, tokenizer=str(tmp_path / "tok")), progress=False)
    meta = read_meta(directory)
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (len(oracle), 1, dtype)
    assert meta["tokenizer"]["kind"] == "hf"
    for split, wanted in (("val", True), ("train", False)):  # the documents as transformers itself encodes them
        expected = [oracle(d, add_special_tokens=False)["input_ids"] for d in corpus if in_val(d, 0.3) == wanted]
        assert [d.tolist() for d in split_stream(directory, split)] == expected
    assert len(AutoTokenizer.from_pretrained(directory)) == len(oracle)  # the tokenizer is saved with the data


@pytest.fixture
def byte_tiktoken(monkeypatch):
    """tiktoken's "gpt2" replaced by a byte-level encoding (no download): token ids are the UTF-8 bytes."""
    import tiktoken

    encoding = tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)


def decode_bytes(directory: Path, split: str) -> list[str]:
    return [bytes(d.astype(np.uint8).tolist()).decode() for d in split_stream(directory, split)]


def test_gpt2_tokenizer_goes_through_tiktoken(tmp_path, corpus, byte_tiktoken):
    directory = prepare(text_files_cfg(tmp_path, tokenizer="gpt2"), progress=False)
    assert directory.name.endswith("-gpt2")
    meta = read_meta(directory)
    assert (meta["vocab_size"], meta["eot_token"], meta["tokenizer"]["kind"]) == (257, 256, "tiktoken")
    check_documents(directory, corpus, 0.3, decode=decode_bytes)


def test_hf_dataset_source_streams_a_local_dataset(tmp_path, byte_tiktoken):
    docs = [f"record {i} " + "x" * i for i in range(30)]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "data.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    cfg = DataConfig(
        name="hf", root=str(tmp_path / "root"), hf_path=str(tmp_path / "hf"), text_field="content", val_fraction=0.3
    )
    cfg.tokenizer, cfg.shard_tokens = "gpt2", 97
    directory = prepare(cfg, progress=False)
    assert directory.name.startswith("hf-") and read_meta(directory)["source"]["kind"] == "hf"
    check_documents(directory, docs, 0.3, decode=decode_bytes)


def test_fineweb10b_downloads_and_renames_the_speedrun_shards(tmp_path, monkeypatch):
    import huggingface_hub

    from recipes.data import write_shard

    requested = []

    def fake_download(repo_id, filename, repo_type, local_dir):
        requested.append((repo_id, filename, repo_type))
        tokens = np.full(300 if "val" in filename else 200, 7, dtype=np.uint16)
        tokens[::50] = 50256  # a document every 50 tokens
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)
        write_shard(Path(local_dir) / filename, tokens, "uint16")
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    cfg = DataConfig(name="fineweb10b", root=str(tmp_path), tokenizer="gpt2", hf_path="kjj0/fineweb10B-gpt2")
    cfg.max_tokens = 250_000_000  # rounds up to 3 shards of 100M
    directory = prepare(cfg, progress=False)
    assert directory.name == "fineweb10b-gpt2-3shards"
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in (1, 2, 3)]
    assert requested == [("kjj0/fineweb10B-gpt2", n, "dataset") for n in names]
    meta = read_meta(directory)
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta.json",
        "train_000000.bin",
        "train_000001.bin",
        "train_000002.bin",
        "val_000000.bin",
    ]
    train_shards = ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert meta["splits"]["train"] == {"tokens": 600, "documents": 12, "shards": train_shards}
    assert meta["splits"]["val"]["tokens"] == 300 and meta["splits"]["val"]["documents"] == 6
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (50257, 50256, "uint16")


# --------------------------------------------------------------------------------- idempotence, atomicity


def test_prepare_is_idempotent_and_checks_what_it_finds(tmp_path, corpus, monkeypatch):
    cfg = text_files_cfg(tmp_path)
    directory = prepare(cfg, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("an existing dataset was rebuilt")

    monkeypatch.setattr(prep, "_build_tokenized", no_rebuild)
    assert prepare(cfg, progress=False) == directory
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamps

    with pytest.raises(DataError, match="prepared with data.val_fraction=0.3, not 0.5"):
        prepare(text_files_cfg(tmp_path, val_fraction=0.5), progress=False)
    # An explicitly named dataset is taken as it is.
    assert prepare(text_files_cfg(tmp_path, val_fraction=0.5, dir_name=directory.name), progress=False) == directory
    with open(tmp_path / "corpus" / "a.txt", "a") as f:
        f.write("more text")
    with pytest.raises(DataError, match="another corpus than the files data.files matches"):
        prepare(cfg, progress=False)


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, corpus, monkeypatch):
    cfg = text_files_cfg(tmp_path, shard_tokens=20)
    documents = prep.TextFilesSource.documents
    passes = []

    def interrupted(self):
        passes.append(self)  # the first pass trains the BPE, the second writes the shards
        for i, doc in enumerate(documents(self)):
            if len(passes) == 2 and i == 30:
                raise KeyboardInterrupt  # after several shards were written
            yield doc

    monkeypatch.setattr(prep.TextFilesSource, "documents", interrupted)
    stale = tmp_path / "root" / f".{dataset_dir(cfg).name}.tmp-999999999"  # a build whose process died
    stale.mkdir(parents=True)
    (stale / "train_000000.bin").write_bytes(b"junk")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert list((tmp_path / "root").iterdir()) == []  # neither a dataset, nor a temporary directory

    monkeypatch.setattr(prep.TextFilesSource, "documents", documents)
    directory = prepare(cfg, progress=False)
    assert read_meta(directory)["splits"]["train"]["documents"] > 0

    shutil.rmtree(directory)
    directory.mkdir()  # e.g. a partial copy
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(cfg, progress=False)


# --------------------------------------------------------------------------------------------- pystdlib


def stdlib_py_files() -> tuple[Path, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return Path(root), sorted(f.replace(os.sep, "/") for f in files)


def test_pystdlib_dataset(pystdlib_data_root, pystdlib_data_dir):
    from tokenizers import Tokenizer

    root, files = stdlib_py_files()
    meta = read_meta(pystdlib_data_dir)
    assert pystdlib_data_dir == pystdlib_data_root / "pystdlib-bpe8192"
    assert meta["source"]["files"] == len(files) > 1000
    nonempty = [f for f in files if (root / f).stat().st_size > 0]
    val_files = [f for f in nonempty if in_val(f, 0.05)]
    assert meta["splits"]["val"]["documents"] == len(val_files)
    assert meta["splits"]["train"]["documents"] == len(nonempty) - len(val_files)
    assert (meta["vocab_size"], meta["dtype"], meta["eot_token"]) == (8192, "uint16", 0)
    assert meta["splits"]["train"]["tokens"] > 5_000_000 and meta["splits"]["val"]["tokens"] > 262_145
    # The first val document is the first val file (sorted order), byte for byte.
    tokenizer = Tokenizer.from_file(str(pystdlib_data_dir / "tokenizer.json"))
    first = split_stream(pystdlib_data_dir, "val")[0]
    assert tokenizer.decode(first.tolist()) == (root / val_files[0]).read_bytes().decode("utf-8", errors="replace")


def test_pystdlib_is_reused_and_fingerprint_checked(pystdlib_data_root, pystdlib_data_dir, tmp_path):
    assert prepare(DataConfig(root=str(pystdlib_data_root)), progress=False) == pystdlib_data_dir
    copy = tmp_path / "pystdlib-bpe8192"
    shutil.copytree(pystdlib_data_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["source"]["fingerprint"] = "0" * 64  # as if prepared by another Python version
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"another corpus than this Python's .* stdlib.*delete it to rebuild") as err:
        prepare(DataConfig(root=str(tmp_path)), progress=False)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ errors


def test_bad_sources_are_clear_errors(tmp_path, corpus):
    corpus_dir = tmp_path / "corpus"
    cases = [
        (DataError, "matches no file", dict(files=[str(tmp_path / "missing" / "*.txt")])),
        (DataError, "data.files is empty", dict(files=[])),
        (ConfigError, "data.name='nope' is unknown", dict(name="nope")),
        (ConfigError, "val_fraction", dict(val_fraction=1.5)),
        (DataError, "does not exist", dict(tokenizer="./no/such/tokenizer")),
    ]
    (corpus_dir / "e.csv").write_text("a,b\n")
    cases.append((DataError, "unsupported file type", dict(files=[str(corpus_dir / "e.csv")])))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    cases.append((DataError, "empty corpus", dict(files=[str(tmp_path / "empty" / "*.txt")])))
    cases.append((DataError, "no document of 36 fell in the val split", dict(val_fraction=1e-12)))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    cases.append((DataError, r"bad.jsonl:2: no field 'text'", dict(files=[str(tmp_path / "bad.jsonl")])))
    for error, message, overrides in cases:
        with pytest.raises(error, match=message) as err:
            prepare(text_files_cfg(tmp_path, **overrides), progress=False)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="data.hf_path is not set"):
        prepare(DataConfig(name="hf", root=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match="ships GPT-2 tokens"):
        prepare(DataConfig(name="fineweb10b", root=str(tmp_path), hf_path="x/y"), progress=False)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def test_tiktoken_without_its_files_is_a_clear_error(tmp_path, corpus, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="tiktoken encoding 'gpt2'.*data.tokenizer=bpe"):
        prepare(text_files_cfg(tmp_path, tokenizer="gpt2"), progress=False)


# --------------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "data" / "prepare.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_help():
    result = run_cli("--help", cwd=REPO)
    assert result.returncode == 0
    assert all(source in result.stdout for source in prep.SOURCES) and "Examples" in result.stdout


def test_cli_prepares_text_files_and_reports_errors(tmp_path, corpus):
    result = run_cli(
        "text_files",
        "corpus/*.txt",
        "corpus/*.jsonl",
        "corpus/*.parquet",
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
        "--val-fraction",
        "0.3",
        "--shard-tokens",
        "97",
        "--root",
        "out",
        "--no-progress",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    directory = dataset_dir(
        text_files_cfg(
            tmp_path, root=str(tmp_path / "out"), files=["corpus/*.txt", "corpus/*.jsonl", "corpus/*.parquet"]
        )
    )
    assert f"prepared {Path('out') / directory.name}" in result.stdout
    check_documents(directory, corpus, 0.3)

    result = run_cli("text_files", "nothing/*.txt", "--root", "out", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: data.files pattern 'nothing/*.txt' matches no file (from {tmp_path}); fix the path or glob"
    ]
