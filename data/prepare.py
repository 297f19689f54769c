"""Prepare a token dataset for `python train.py` (a thin CLI over recipes.prepare).

Examples:
  python data/prepare.py pystdlib                                   # the embedded default corpus (offline)
  python data/prepare.py pystdlib --vocab-size 4096
  python data/prepare.py text_files 'corpus/**/*.jsonl' --tokenizer gpt2
  python data/prepare.py hf HuggingFaceFW/fineweb --name sample-10BT --max-tokens 100000000 --num-proc 8
  python data/prepare.py fineweb10b --max-tokens 900000000         # the speedrun's GPT-2 shards (download)

The dataset goes to <root>/<dir name> (default root: data/; the path is printed at the end). `python train.py`
prepares its data set itself on first use; to train on one prepared here, pass the same settings
(`python train.py data=text_files data.files='[corpus/**/*.jsonl]' data.tokenizer=gpt2`) or its name
(`python train.py data=text_files data.dir_name=<dir name>`). An existing dataset is only checked, never
rebuilt, unless --force is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recipes.config import DataConfig  # noqa: E402
from recipes.errors import RecipeError  # noqa: E402

SOURCES = ("pystdlib", "text_files", "hf", "fineweb10b")  # the subcommands, as recipes.prepare.SOURCES

DEFAULTS = DataConfig()


def _common(parser: argparse.ArgumentParser, *, tokenizer: str) -> None:
    parser.add_argument(
        "--root", default=DEFAULTS.root, help="directory holding prepared datasets (default: %(default)s)"
    )
    parser.add_argument("--dir-name", help="dataset directory name (default: derived from source and tokenizer)")
    parser.add_argument(
        "--tokenizer",
        default=tokenizer,
        help="bpe (train a byte-level BPE on the corpus), gpt2 / tiktoken:<encoding>, or a Hugging Face "
        "tokenizer (local directory or cached name) (default: %(default)s)",
    )
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size, help="BPE vocab (default: %(default)s)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULTS.val_fraction,
        help="share of documents for val (default: %(default)s)",
    )
    parser.add_argument("--max-tokens", type=int, help="stop after this many train tokens (default: all)")
    parser.add_argument(
        "--shard-tokens", type=int, default=DEFAULTS.shard_tokens, help="tokens per shard (default: %(default)s)"
    )
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizer worker processes (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="delete an existing dataset of the same name and rebuild")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data/prepare.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{" + ",".join(SOURCES) + "}")

    p = sub.add_parser("pystdlib", help="this Python's standard library sources (offline; the default corpus)")
    _common(p, tokenizer="bpe")

    p = sub.add_parser("text_files", help="local .txt (one document per file), .jsonl and .parquet (one per record)")
    p.add_argument("files", nargs="+", help="files or globs (quote them; ** recurses)")
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column of the text (default: %(default)s)")
    _common(p, tokenizer="gpt2")

    p = sub.add_parser("hf", help="a Hugging Face dataset, streamed")
    p.add_argument("path", help="dataset name or path, e.g. HuggingFaceFW/fineweb")
    p.add_argument("--name", help="dataset config, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="dataset split to read (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="record field holding the text (default: %(default)s)")
    p.add_argument("--no-streaming", action="store_true", help="download the whole split first instead of streaming")
    _common(p, tokenizer="gpt2")

    p = sub.add_parser("fineweb10b", help="the NanoGPT speedrun's pre-tokenized FineWeb-10B GPT-2 shards (download)")
    p.add_argument(
        "--repo", default="kjj0/fineweb10B-gpt2", help="HF dataset repo of the shards (default: %(default)s)"
    )
    p.add_argument("--max-tokens", type=int, help="train tokens, rounded up to 100M-token shards (default: all 103)")
    p.add_argument("--root", default=DEFAULTS.root, help="directory holding prepared datasets (default: %(default)s)")
    p.add_argument("--dir-name", help="dataset directory name (default: fineweb10b-gpt2-<N>shards)")
    p.add_argument("--force", action="store_true", help="delete an existing dataset of the same name and rebuild")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> DataConfig:
    """The DataConfig (the `data` group of train.py) equivalent to the command line."""
    cfg = DataConfig(name=args.source, root=args.root, dir_name=args.dir_name, max_tokens=args.max_tokens)
    if args.source == "fineweb10b":
        cfg.tokenizer, cfg.hf_path = "gpt2", args.repo
        return cfg
    cfg.tokenizer, cfg.vocab_size, cfg.val_fraction = args.tokenizer, args.vocab_size, args.val_fraction
    cfg.shard_tokens, cfg.num_proc = args.shard_tokens, args.num_proc
    if args.source == "text_files":
        cfg.files, cfg.text_field = list(args.files), args.text_field
    elif args.source == "hf":
        cfg.hf_path, cfg.hf_name, cfg.hf_split = args.path, args.name, args.split
        cfg.text_field, cfg.streaming = args.text_field, not args.no_streaming
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help answers at once (these import torch via recipes.data).
    from recipes.data import read_meta
    from recipes.prepare import dataset_dir, prepare

    cfg = config_from_args(args)
    try:
        existed = dataset_dir(cfg).exists() and not args.force
        directory = prepare(cfg, progress=not args.no_progress, force=args.force)
        meta = read_meta(directory)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was left behind (the dataset is written only when complete)", file=sys.stderr)
        return 130
    splits = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in meta["splits"].items())
    print(f"{'found' if existed else 'prepared'} {directory}: {splits}")
    print(
        f"tokenizer {meta['tokenizer']['name']} (vocab {meta['vocab_size']}, eot {meta['eot_token']}, {meta['dtype']})"
    )
    print(f"train on it: python train.py data={cfg.name} data.root={cfg.root} data.dir_name={directory.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
