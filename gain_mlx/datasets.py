"""Training data: mlx-lm's jsonl folders (text, completions or chat), checked, loaded,
truncated to ``--max-seq-length`` with one note, and fingerprinted for the lineage."""

import hashlib
import json
import math
from pathlib import Path

from .errors import UsageError, UserError

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


class Truncated:
    """A dataset whose items are cut to ``max_len`` tokens (mlx-lm would warn every batch)."""

    def __init__(self, dataset, max_len: int):
        self._data, self._max_len = dataset, max_len

    def __len__(self):
        return len(self._data)

    def __getitem__(self, idx):
        item = self._data[idx]
        if isinstance(item, tuple):
            return item[0][: self._max_len], item[1]
        return item[: self._max_len]

    def count_truncated(self) -> int:
        def length(item):
            return len(item[0] if isinstance(item, tuple) else item)

        return sum(length(self._data[i]) > self._max_len for i in range(len(self._data)))


def truncate(dataset, max_len: int, name: str):
    if not len(dataset):
        return dataset
    wrapped = Truncated(dataset, max_len)
    n = wrapped.count_truncated()
    if n:
        print(
            f"Note: {n} of {len(dataset)} {name} sequences are longer than --max-seq-length "
            f"{max_len} and are truncated; split the data into shorter chunks to use all of it"
        )
    return wrapped


def check_jsonl(path: Path) -> None:
    """Name the first line of ``path`` that is not a JSON object."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise UserError(f"{path} line {i} is not a valid JSON object ({e}): fix or remove that line") from None


def load_data(args, tokenizer):
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

    data = Path(args.data) if args.data else EXAMPLE_DATA
    if args.data is None:
        print(f"No --data given: using the example dataset in {data}")
    if not (data / "train.jsonl").is_file():
        raise UserError(f"{data}/train.jsonl not found: --data needs a folder with train.jsonl (and valid.jsonl)")
    if not (data / "train.jsonl").read_text().strip():
        raise UserError(f"{data}/train.jsonl is empty: add training examples, one JSON object a line")
    for name in ("train", "valid", "test"):
        check_jsonl(data / f"{name}.jsonl")
    if not (data / "valid.jsonl").is_file():
        print(f"Note: no {data}/valid.jsonl: training without validation (add one to see validation loss)")
    try:
        sets = load_local_dataset(data, tokenizer, args)
    except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the data in {data}: {e}") from None
    return [
        truncate(CacheDataset(s), args.max_seq_length, name) if len(s) else s
        for s, name in zip(sets, ("train", "valid", "test"))
    ]


def check_sizes(args, train_set):
    for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "grad_accumulation_steps"):
        if getattr(args, name) < (0 if name == "iters" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if Path(args.adapter_path).exists() and not Path(args.adapter_path).is_dir():
        raise UsageError(f"--adapter-path {args.adapter_path} is a file: pass a folder")
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise UsageError(f"--learning-rate {args.learning_rate} must be a positive finite number")
    if args.iters and len(train_set) < args.batch_size:
        raise UserError(
            f"train.jsonl has {len(train_set)} examples, fewer than --batch-size {args.batch_size}"
        )


def data_folder(args) -> Path:
    return Path(args.data) if args.data else EXAMPLE_DATA


def data_fingerprint(folder: Path) -> str:
    """sha256 (16 hex digits) of a data folder's train.jsonl and valid.jsonl."""
    h = hashlib.sha256()
    for name in ("train.jsonl", "valid.jsonl"):
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()[:16]
