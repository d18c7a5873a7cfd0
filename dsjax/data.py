"""Text corpora with grain: documents -> tokens -> packed windows -> shuffled batches.

Pretraining reads its batches here and evaluation its validation split, so the module
lives below both `train` and `eval`.

Sources: the running Python's standard library (`source: stdlib`, every machine has it,
no download), text files or folders, and JSONL files with a text field. Documents are
tokenized, joined with EOS and packed into windows of seq_len + 1 tokens (inputs and
shifted targets). Documents (files, or JSONL records) are split into train and validation
by a hash of their path (and line), so validation text is held out. The order is a deterministic shuffle by seed; each host reads
its own rows of every global batch, so a global batch holds the same windows whatever
the number of hosts, and the iterator position (the step) goes into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Attributes:
      source: 'stdlib', or comma-separated files / folders / globs (.txt, .py, .md, .jsonl ...).
      text_field: the field holding the text in JSONL records.
      tokenizer: 'bytes' (byte-level) or a path to a Hugging Face tokenizer.json.
      val_fraction: share of documents held out for validation (JSONL records, or whole
        files), chosen by a hash of their text, so a corpus splits the same wherever it lies.
      max_bytes: stop reading documents after this many bytes (0: no limit).
      file_pattern: which files to take from folders.
    """

    source: str = "stdlib"
    text_field: str = "text"
    tokenizer: str = "bytes"
    val_fraction: float = 0.05
    max_bytes: int = 6_000_000
    file_pattern: str = "*.py"


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def source_files(cfg: DataConfig, pattern_key: str = "data.file_pattern") -> list[str]:
    """The files of `cfg.source`: 'stdlib', or files, folders (their files matching
    `cfg.file_pattern`, recursively) and globs, comma-separated.

    Args:
      pattern_key: the setting the file pattern comes from, named when a folder holds no
        matching file ('': the caller fixed it).
    Raises:
      FileNotFoundError naming the part of the source that gives no file (and, for a
      folder, the pattern and what the folder holds instead).
    """
    if cfg.source == "stdlib":
        return _stdlib_files()
    files = []
    for part in cfg.source.split(","):
        part = part.strip()
        if os.path.isdir(part):
            found = sorted(f for f in glob.glob(os.path.join(part, "**", cfg.file_pattern), recursive=True)
                           if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(_no_match(part, cfg.file_pattern, pattern_key))
            files += found
        elif os.path.isfile(part):
            files.append(part)
        else:
            matched = sorted(glob.glob(part, recursive=True))
            if not matched:
                raise FileNotFoundError(f"data.source: {part!r} is no file, folder or matching glob")
            files += matched
    if not files:
        raise FileNotFoundError(f"data.source={cfg.source!r} holds no files matching {cfg.file_pattern!r}")
    return files


def _no_match(folder: str, pattern: str, pattern_key: str) -> str:
    """Why a folder of data.source gives no file: the pattern, its key and the kinds of
    files the folder does hold."""
    kinds: dict[str, int] = {}
    for _, _, names in os.walk(folder):
        for name in names:
            ext = os.path.splitext(name)[1]
            kind = f"*{ext}" if ext else name
            kinds[kind] = kinds.get(kind, 0) + 1
    common = sorted(kinds.items(), key=lambda kv: -kv[1])
    where = f" ({pattern_key})" if pattern_key else ""
    if not common:
        return f"data.source: the folder {folder} holds no files matching {pattern!r}{where}; it is empty"
    held = ", ".join(f"{n} {k}" for k, n in common[:4]) + (", ..." if len(common) > 4 else "")
    hint = f"; --set {pattern_key}='{common[0][0]}' takes the {common[0][0]} files" if pattern_key else ""
    return f"data.source: the folder {folder} holds no files matching {pattern!r}{where}; it holds {held}{hint}"


class JSONLError(ValueError):
    """A line of a JSONL file that is not a JSON object; the message names path:line."""


def read_jsonl(path: str, numbered: bool = False, errors: list[str] | None = None) -> list:
    """The records of a JSONL file (one JSON object per line; blank lines skipped).

    Args:
      path: the file (UTF-8).
      numbered: return (line number, record) pairs (from 1), so a caller's own checks of a
        record can name its line.
      errors: where to put the one-line message of each malformed line (not JSON, or not
        an object) and go on; None: the first one raises JSONLError.
    Returns:
      [record, ...] (dicts), or [(n, record), ...] with `numbered`, in file order.
    Raises:
      JSONLError naming `path:line`; OSError / UnicodeDecodeError from reading the file.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JSONLError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise JSONLError(f"{path}:{n}: a record must be a JSON object")
            except JSONLError as e:
                if errors is None:
                    raise
                errors.append(str(e))
                continue
            out.append((n, record) if numbered else record)
    return out


def _documents(path: str, cfg: DataConfig):
    """The documents of one source file: each JSONL record's text field, or the whole file."""
    if path.endswith(".jsonl"):
        for n, record in read_jsonl(path, numbered=True):
            if cfg.text_field not in record:
                raise KeyError(f"{path}:{n}: record has no field {cfg.text_field!r} (data.text_field)")
            yield str(record[cfg.text_field])
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def is_validation(key: str, fraction: float) -> bool:
    """Whether the document (or example) `key` is held out for validation: a stable hash."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < fraction * 10_000


@dataclasses.dataclass
class Corpus:
    """Token streams for training and validation, and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: object
    num_files: int

    def unigram_baseline(self) -> float:
        """Validation cross-entropy (nats/token) of the training token frequencies."""
        vocab = max(int(self.train.max()), int(self.val.max())) + 1
        counts = np.bincount(self.train, minlength=vocab).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-logp[self.val].mean())


def load_corpus(cfg: DataConfig, tokenizer) -> Corpus:
    """Reads and tokenizes the source until each split holds its share of `max_bytes`."""
    files = source_files(cfg)
    order = np.random.default_rng(1234).permutation(len(files))  # a spread of files, fixed
    splits = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    quota = {"train": (1 - cfg.val_fraction) * cfg.max_bytes, "val": cfg.val_fraction * cfg.max_bytes}
    eos = np.asarray([tokenizer.eos_id], np.int32)
    used = 0
    for i in order:
        path = files[i]
        for doc in _documents(path, cfg):  # keyed on the text: the split does not move with the files
            split = "val" if is_validation(doc, cfg.val_fraction) else "train"
            if not doc.strip() or (cfg.max_bytes and sizes[split] >= quota[split]):
                continue
            splits[split].extend([tokenizer.encode(doc), eos])
            sizes[split] += len(doc)
        used += 1
        if cfg.max_bytes and all(sizes[k] >= quota[k] for k in sizes):
            break
    train, val = splits["train"], splits["val"]
    if not train or not val:
        raise ValueError(f"data.source={cfg.source!r}: need documents for both training and validation "
                         f"(got {len(train) // 2} and {len(val) // 2}); adjust data.val_fraction")
    return Corpus(np.concatenate(train), np.concatenate(val), tokenizer, used)


class Windows:
    """Random access to packed windows of `length + 1` tokens of one stream."""

    def __init__(self, tokens: np.ndarray, length: int):
        self.tokens, self.length = tokens, length
        self.count = (len(tokens) - 1) // length
        if self.count < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one window of seq_len={length}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i * self.length:i * self.length + self.length + 1]


def _split(batch: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": batch[:, :-1].astype(np.int32), "targets": batch[:, 1:].astype(np.int32)}


def train_iterator(tokens: np.ndarray, seq_len: int, local_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
    """Endless shuffled batches {'inputs', 'targets'}: int32 [local_batch, seq_len].

    The returned grain iterator has get_state()/set_state() for checkpoints.
    """
    windows = Windows(tokens, seq_len)
    if len(windows) < local_batch * process_count:
        raise ValueError(f"{len(windows)} training windows are fewer than one global batch of "
                         f"{local_batch * process_count}")
    # Shuffle the global order first, then stride by process: global batch j is always
    # elements [j*B, (j+1)*B) of the shuffled stream, however many processes read it.
    ds = grain.MapDataset.source(windows).seed(seed).shuffle().repeat(None)[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True).map(_split)
    return iter(ds.to_iter_dataset())


def eval_batches(tokens: np.ndarray, seq_len: int, local_batch: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` validation batches of this host, in order (the same every eval)."""
    windows = Windows(tokens, seq_len)
    ds = grain.MapDataset.source(windows)[process_index::process_count]
    n = min(num_batches, len(windows) // (local_batch * process_count))
    if n < 1:
        raise ValueError(f"validation split has {len(windows)} windows, fewer than one global batch of "
                         f"{local_batch * process_count}")
    ds = ds.batch(local_batch, drop_remainder=True).map(_split)
    return [ds[i] for i in range(n)]
