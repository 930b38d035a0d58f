"""Tokenizers and training text: documents from .txt/.jsonl files, one token stream, lanes of it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError

DATA_SUFFIXES = (".txt", ".jsonl")
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; documents end with a blank line."""

    kind = "bytes"
    vocab_size = 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    @property
    def separator(self) -> list[int]:
        return [10, 10]


class FileTokenizer:
    """A `tokenizer.json` through the `tokenizers` library; documents end with its EOS token if it has one."""

    kind = "tokenizer.json"

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{path}: reading it needs the 'tokenizers' package (pip install tokenizers), "
                            "or pass --tokenizer bytes") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises its own Exception type
            raise DataError(f"{path}: not a valid tokenizer.json ({exc}); fix it or pass --tokenizer bytes") from None
        self.path = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self._separator = self._find_separator(path.parent / "tokenizer_config.json")

    def _find_separator(self, config_path: Path) -> list[int]:
        names = []
        if config_path.exists():
            try:
                eos = json.loads(config_path.read_text()).get("eos_token")
            except (ValueError, RecursionError, AttributeError):  # not JSON, too deep, huge integer, not an object
                eos = None
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                names.append(eos)
        for name in [*names, *EOS_CANDIDATES]:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return [token_id]
        return self.tokenizer.encode("\n\n", add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    @property
    def separator(self) -> list[int]:
        return self._separator


def checkpoint_dir(checkpoint: Path) -> Path:
    return checkpoint if checkpoint.is_dir() else checkpoint.parent


def load_tokenizer(checkpoint: Path, kind: str = "auto"):
    """tokenizer.json beside the checkpoint (what the conversion copied), else the byte-level fallback."""
    path = checkpoint_dir(checkpoint) / "tokenizer.json"
    if kind == "auto" and path.exists():
        return FileTokenizer(path)
    return ByteTokenizer()


def _expand(paths: Sequence[Path], option: str) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no .txt or .jsonl files ({option})")
            files.extend(found)
        elif not path.exists():
            raise DataError(f"{path}: no such file ({option})")
        elif path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{path}: unsupported data file type {path.suffix or '(no suffix)'!r}: use .txt "
                            f"(one document per file) or .jsonl (one {{\"text\": ...}} object per line)")
        else:
            files.append(path)
    return files


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def read_documents(paths: Sequence[Path], option: str = "--data") -> list[str]:
    """Every document of the given files, in order. Bad files are a DataError naming the file and line."""
    documents = []
    for path in _expand(paths, option):
        text = _decode(path, path.read_bytes())
        if path.suffix == ".txt":
            if not text.strip():
                raise DataError(f"{path}: empty file ({option})")
            documents.append(text)
            continue
        count = 0
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
            except ValueError as exc:  # an integer past Python's digit limit
                raise DataError(f"{path}:{number}: not valid JSON ({str(exc).split(';')[0][:120]})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{path}:{number}: no \"text\" field (each line must be an object like "
                                f"{{\"text\": \"...\"}})")
            if not isinstance(record["text"], str):
                raise DataError(f"{path}:{number}: \"text\" must be a string, got "
                                f"{type(record['text']).__name__}")
            if record["text"].strip():
                documents.append(record["text"])
                count += 1
        if not count:
            raise DataError(f"{path}: no documents (no line has a non-empty \"text\") ({option})")
    return documents


def tokenize_documents(documents: list[str], tokenizer, vocab_size: int, seed: int | None) -> torch.Tensor:
    """Shuffle (when seed is given), tokenize, join with the separator: one int32 token stream."""
    if seed is not None:
        documents = list(documents)
        random.Random(seed).shuffle(documents)
    separator = tokenizer.separator
    stream: list[int] = []
    for start in range(0, len(documents), 1024):
        for ids in tokenizer.encode_batch(documents[start:start + 1024]):
            stream.extend(ids)
            stream.extend(separator)
    ids = torch.tensor(stream, dtype=torch.int32)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise DataError(f"the {tokenizer.kind} tokenizer gives token id {int(ids.max())}, but the model's "
                        f"vocab_size is {vocab_size}")
    return ids


class LaneBatches:
    """The token stream cut into `batch` contiguous lanes read `seq_len` tokens at a time, in lockstep.

    Step s reads chunk s % chunks_per_epoch of every lane; targets are the inputs shifted by one token.
    A pure function of the step, so a resumed run reads exactly what the uninterrupted one would have.
    """

    def __init__(self, ids: torch.Tensor, batch: int, seq_len: int):
        lane = (ids.numel() - 1) // batch
        if lane < seq_len:
            raise DataError(f"the training data has {ids.numel():,} tokens: too few for one batch of "
                            f"--batch-size {batch} x --seq-len {seq_len} (needs {batch * seq_len + 1:,}); "
                            f"give more data or smaller values")
        self.ids, self.batch, self.seq_len, self.lane = ids.long(), batch, seq_len, lane
        self.chunks_per_epoch = lane // seq_len
        self.offsets = torch.arange(batch)[:, None] * lane + torch.arange(seq_len + 1)[None, :]

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        chunk = step % self.chunks_per_epoch
        window = self.ids[self.offsets + chunk * self.seq_len]
        return window[:, :-1], window[:, 1:], chunk == 0
