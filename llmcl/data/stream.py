"""Text corpora for continual pre-training: streamed once through the tokenizer into a memory-mapped token
file, then served as fixed-length blocks. The corpus is never held in memory: records are read one at a
time (jsonl/txt/csv line by line, parquet batch by batch, hub datasets with streaming=True), tokenized in
small batches and appended to <cache>/<key>.bin (uint32). A corpus far larger than RAM trains from the
page cache.

The token file depends on the source (path, size, mtime), the records taken from it (split, holdout, record
limit, seed), the text field and the tokenizer, not on seq_len: any block length can be cut from the same file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llmcl.data import builtin
from llmcl.data.formatting import Example, bos_of, document_tokens, fields
from llmcl.data.sources import (csv_records, is_builtin, is_local, json_line, read_file, seeded_subset, split_of,
                                unreadable)
from llmcl.errors import LlmclError

DTYPE = np.uint32
BATCH = 256  # documents tokenized together
HUB_SHUFFLE_BUFFER = 10_000  # records datasets' streamed shuffle draws from (a hub source with a record limit)


def iter_records(cfg: Any, split: str, seed: int) -> Iterator[dict[str, Any]]:
    """Records of a split, one at a time, without reading the whole source into memory."""
    if getattr(cfg, "holdout", None) is not None:  # a held-out split needs the whole source: not streamed
        from llmcl.data.sources import load_records

        yield from load_records(cfg, split, seed) or []
        return
    path, split_name, _ = split_of(cfg, split)
    if is_builtin(path):
        yield from builtin.generate(path.split(":", 1)[1], split_name, seed)
        return
    if not is_local(path):
        yield from _hub_stream(path, cfg.subset, split_name)
        return
    p = Path(path).expanduser()
    if p.is_dir():
        from llmcl.data.sources import _split_file, missing_split

        f = _split_file(p, split_name)
        if f is None:
            raise missing_split(p, split, split_name)
        p = f
    yield from _local_records(p)


def _hub_stream(path: str, subset: str | None, split_name: str, shuffle_seed: int | None = None) -> Any:
    """A hub dataset's split, streamed (datasets' buffered shuffle of it with `shuffle_seed`)."""
    import datasets

    try:
        ds = datasets.load_dataset(path, subset, split=split_name, streaming=True)
    except Exception as exc:
        raise LlmclError(f"cannot load hub dataset {path!r} split {split_name!r}: "
                         f"{str(exc).splitlines()[0]}") from None
    return ds if shuffle_seed is None else ds.shuffle(seed=shuffle_seed, buffer_size=HUB_SHUFFLE_BUFFER)


def sampled_records(cfg: Any, split: str, seed: int) -> Iterator[dict[str, Any]]:
    """The records of a split that data.max_train_samples / max_test_samples keep, one at a time. A local or
    built-in source gives the same seeded subset as load_records (one pass counts the records, a second reads
    the kept ones); a hub dataset, streamed and of unknown length, the first N of datasets' buffered shuffle of
    the stream."""
    path, split_name, limit = split_of(cfg, split)
    if limit is None or getattr(cfg, "holdout", None) is not None:  # load_records applies the limit to a holdout
        yield from iter_records(cfg, split, seed)
        return
    if not (is_builtin(path) or is_local(path)):
        yield from itertools.islice(_hub_stream(path, cfg.subset, split_name, shuffle_seed=seed), limit)
        return
    count = sum(1 for _ in iter_records(cfg, split, seed))
    keep = set(seeded_subset(count, limit, split, seed))
    yield from (record for i, record in enumerate(iter_records(cfg, split, seed)) if i in keep)


def _local_records(p: Path) -> Iterator[dict[str, Any]]:
    """The records of one local file, streamed; a file that cannot be parsed is one line naming it and where."""
    n = 0
    try:
        if p.suffix == ".jsonl" or p.suffix == ".txt":
            with p.open(encoding="utf-8-sig") as fh:
                for line in fh:
                    n += 1
                    if line.strip():
                        yield json_line(p, line, n) if p.suffix == ".jsonl" else {"text": line.rstrip("\n")}
        elif p.suffix == ".csv":
            with p.open(newline="", encoding="utf-8-sig") as fh:
                yield from csv_records(p, fh)
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    n += 1
                    yield record
        else:  # .json arrays cannot be streamed
            yield from read_file(p)
    except Exception as exc:  # noqa: BLE001
        where = f" (line {n})" if n and p.suffix in (".jsonl", ".txt") else ""
        raise unreadable(p, exc, where) from None


def _cache_key(cfg: Any, split: str, tokenizer: Any, seed: int, bos: int | None = None) -> str:
    """What a token file holds: the source and the records taken from it (the split's name, a holdout, a
    limit, and the seed that draws them), the text field, the tokenizer and the BOS documents begin with."""
    path, split_name, limit = split_of(cfg, split)
    ident: dict[str, Any] = {"path": path, "split": split, "split_name": split_name,
                             "holdout": getattr(cfg, "holdout", None), "field": cfg.text_field, "subset": cfg.subset,
                             "tokenizer": getattr(tokenizer, "name_or_path", ""), "vocab": len(tokenizer),
                             "eos": tokenizer.eos_token_id, "max": limit}
    if is_builtin(path) or limit is not None or ident["holdout"] is not None:  # the seed draws the records
        ident["seed"] = seed
    if bos is not None:  # (absent otherwise: the token files written before data.add_bos keep their keys)
        ident["bos"] = bos
    if is_local(path):
        p = Path(path).expanduser()
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        ident["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenize_to_file(records: Iterator[dict[str, Any]], field: str, tokenizer: Any, out: Path,
                     bos: int | None = None) -> int:
    """Append every document's tokens (`bos` +, + EOS) to `out` as uint32; returns the token count."""
    total = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        batch: list[str] = []

        def flush() -> int:
            n = 0
            for ids in document_tokens(batch, tokenizer, bos):
                np.asarray(ids, dtype=DTYPE).tofile(fh)
                n += len(ids)
            batch.clear()
            return n

        for record in records:
            if field not in record:
                raise LlmclError(f"a text record has no field {field!r} (fields: {fields(record)}); "
                                 "set data.text_field")
            batch.append(record[field])
            if len(batch) >= BATCH:
                total += flush()
        if batch:
            total += flush()
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return total


class PackedBlocks:
    """Fixed-length blocks of a memory-mapped token file: block j = tokens[j*L:(j+1)*L] (the tail is dropped)."""

    def __init__(self, token_file: Path, seq_len: int):
        self.path = token_file
        self.seq_len = seq_len
        size = token_file.stat().st_size // np.dtype(DTYPE).itemsize
        self.tokens = np.memmap(token_file, dtype=DTYPE, mode="r", shape=(size,)) if size else np.zeros(0, DTYPE)
        self.n_tokens = size
        if size < 2:
            raise LlmclError(f"text data in {token_file} has fewer than 2 tokens")

    def __len__(self) -> int:
        return max(1, self.n_tokens // self.seq_len)

    def __getitem__(self, j: int) -> Example:
        if not 0 <= j < len(self):
            raise IndexError(j)
        ids = self.tokens[j * self.seq_len:(j + 1) * self.seq_len].tolist()
        return Example(ids, ids)

    def label_count(self, j: int) -> int:
        return min(self.seq_len, self.n_tokens - j * self.seq_len) - 1

    def mean_label_count(self) -> float:
        """Trained tokens a block carries, on average: every block is full but a corpus's only, short one."""
        return min(self.seq_len, self.n_tokens) - 1


def text_blocks(cfg: Any, split: str, tokenizer: Any, seq_len: int, seed: int, cache_dir: Path,
                key: str = "data") -> PackedBlocks:
    """The split's text as packed blocks, tokenizing the source into the cache on first use (`key`: the data
    config's recipe key, for the messages)."""
    bos = bos_of(cfg, tokenizer, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    token_file = cache_dir / f"{_cache_key(cfg, split, tokenizer, seed, bos)}.bin"
    if not token_file.exists():
        tokenize_to_file(sampled_records(cfg, split, seed), cfg.text_field, tokenizer, token_file, bos)
    return PackedBlocks(token_file, seq_len)


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux), for memory-budget checks."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
