"""Fine-tuning the MM-Rec runtime on text (CONVERSION.md "Fine-tuning").

Data: `.txt` files (each one document), `.jsonl` files (one JSON object per line, its `text` field one
document), or directories holding them. Documents are shuffled once (by the seed), tokenized with the
checkpoint's `tokenizer.json` (the `tokenizers` library) or with bytes, joined with an end-of-document
token (or a blank line) and cut into `batch_size` lanes. Each step reads the next `seq_len` tokens of every
lane, and the recurrent state is carried from one step to the next (truncated backpropagation through
time), so a document longer than `seq_len` is read with the context of its earlier chunks. The state is
reset when the lanes wrap round to the start (a new epoch).

Training: AdamW (weight decay on matrices only), linear warmup then cosine decay to `min_lr_ratio * lr`,
gradient clipping, bf16 autocast on CUDA with float32 master weights.

Output directory:
    config.json, model*.safetensors [+ index], tokenizer files   the final model (`from_pretrained(OUT)`)
    loss_log.jsonl, loss.png, finetune_summary.json              the run
    train_state/   model + optimizer.pt + recurrent_state.pt + trainer_state.json (step, schedule,
                   RNG states): what `resume=True` continues from, to the same loss sequence.

This module is part of the runtime: it never imports dask or typer; `tokenizers` and `matplotlib` are
imported only when used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, checkpoint_file_paths, checkpoint_files, parse_size, torch_dtype
from .config import MMRecConfig
from .model import BlockState, MMRecModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.json", "chat_template.jinja", "tokenizer.tiktoken")
TRAIN_STATE = "train_state"
LOSS_LOG = "loss_log.jsonl"
LOSS_PLOT = "loss.png"
SUMMARY = "finetune_summary.json"
DATA_SUFFIXES = (".txt", ".jsonl")
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
# Settings that define a run: a resume with any of them changed is refused.
MAX_SKIPPED_STEPS = 5  # non-finite loss or gradient this many steps in a row is an error
RUN_SETTINGS = ("checkpoint", "data", "fresh", "num_steps", "lr", "batch_size", "seq_len", "warmup_steps",
                "min_lr_ratio", "weight_decay", "grad_clip", "dropout", "seed", "tokenizer")


class DataError(ValueError):
    """A training or evaluation data file that cannot be used; the message names the file (and line)."""


class TrainingError(ValueError):
    """Training that cannot go on (a non-finite loss, a device that is not there)."""


class FinetuneRefused(Exception):
    """The output cannot be written as asked (exists without resume, resume with changed settings)."""


# ----------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FinetuneOptions:
    checkpoint: Path
    data: Sequence[Path]
    num_steps: int
    output: Path
    lr: float = 3e-4
    batch_size: int = 8
    seq_len: int = 128
    device: str | None = None  # default: cuda if available, else cpu
    grad_checkpointing: bool = False
    resume: bool = False
    overwrite: bool = False
    fresh: bool = False  # a freshly initialised model of the checkpoint's config (PyTorch default init)
    seed: int = 0
    warmup_steps: int | None = None  # default: 10% of num_steps, at most 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float | None = None  # default: the config's
    eval_data: Sequence[Path] = ()
    eval_every: int = 0  # 0: only before the first and after the last step
    eval_tokens: int = 262_144  # at most this many held-out tokens per evaluation
    save_every: int = 0  # 0: only at the end (and when interrupted)
    max_shard_size: str = "2GB"
    save_dtype: str | None = None  # dtype of the final model; default float32
    tokenizer: str = "auto"  # "auto": tokenizer.json beside the checkpoint, else bytes; or "bytes"
    stop_at: int | None = None  # stop after this step as if interrupted (leaves a resumable state)
    threads: int | None = None  # CPU threads for torch during the run (default: torch's)

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.output = Path(self.output)
        self.data = [Path(p) for p in self.data]
        self.eval_data = [Path(p) for p in self.eval_data]
        if self.warmup_steps is None:
            self.warmup_steps = min(100, self.num_steps // 10)

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        for name in ("num_steps", "batch_size", "seq_len", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be greater than 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("--weight-decay and --grad-clip must be >= 0")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.tokenizer not in ("auto", "bytes"):
            raise ValueError(f"--tokenizer must be auto or bytes, got {self.tokenizer!r}")
        if not self.data:
            raise DataError("no training data: give --data FILE (.txt or .jsonl) at least once")
        parse_size(self.max_shard_size)
        if self.save_dtype is not None:
            torch_dtype(self.save_dtype)

    def settings(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        out = {name: values[name] for name in RUN_SETTINGS}
        out["checkpoint"] = str(Path(self.checkpoint).resolve())
        out["data"] = [str(Path(p).resolve()) for p in self.data]
        return out


def lr_at(step: int, options: FinetuneOptions) -> float:
    """Learning rate of 0-based `step`: linear warmup to lr, then cosine down to min_lr_ratio * lr."""
    warmup, total, base = options.warmup_steps, options.num_steps, options.lr
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = options.min_lr_ratio
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------
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
            except (json.JSONDecodeError, AttributeError):
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


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# State helpers
# ----------------------------------------------------------------------------------------------------------
def detach_state(state):
    return tuple(BlockState(s.h.detach(), s.mem.detach(), s.acc.detach(), s.n) for s in state)


def state_to_dict(state) -> dict[str, Any]:
    return {"h": [s.h.cpu() for s in state], "mem": [s.mem.cpu() for s in state],
            "acc": [s.acc.cpu() for s in state], "n": [int(s.n) for s in state]}


def state_from_dict(data: dict[str, Any], device) -> tuple:
    return tuple(BlockState(h.to(device), m.to(device), a.to(device), n)
                 for h, m, a, n in zip(data["h"], data["mem"], data["acc"], data["n"]))


def _rng_state() -> dict[str, Any]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available here")
    return device


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MMRecModel, ids: torch.Tensor, batch: int, seq_len: int, device: torch.device,
             max_tokens: int | None = None) -> float:
    """Mean next-token loss over held-out tokens: `batch` lanes from a fresh state, read `seq_len` at a time
    with the state carried (so each token sees its lane's whole prefix). Dropout off."""
    ids = ids.long()
    lanes = max(1, min(batch, (ids.numel() - 1) // seq_len))
    lane = (ids.numel() - 1) // lanes
    if max_tokens:
        lane = min(lane, max(1, max_tokens // lanes))
    if lane < 1:
        raise DataError("the evaluation data has fewer than 2 tokens")
    was_training = model.training
    model.eval()
    starts = torch.arange(lanes)[:, None] * lane
    total, count, state = 0.0, 0, None
    try:
        for begin in range(0, lane, seq_len):
            width = min(seq_len, lane - begin)
            window = ids[starts + begin + torch.arange(width + 1)[None, :]].to(device)
            with _autocast(device):
                logits, state = model(window[:, :-1], state)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1),
                                   reduction="sum")
            total += float(loss)
            count += window[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------------------
def _clear_output(output: Path) -> None:
    """--overwrite: remove what a fine-tuning run writes, and nothing else."""
    for path in checkpoint_file_paths(output):
        path.unlink()
    for name in (*TOKENIZER_FILES, LOSS_LOG, LOSS_PLOT, SUMMARY):
        (output / name).unlink(missing_ok=True)
    for name in (TRAIN_STATE, TRAIN_STATE + ".tmp", TRAIN_STATE + ".old"):
        shutil.rmtree(output / name, ignore_errors=True)


def _write_model(model: MMRecModel, directory: Path, options: FinetuneOptions, dtype=None) -> None:
    tmp = directory.with_name(directory.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=options.max_shard_size, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    for path in checkpoint_file_paths(directory):
        path.unlink()
    for path in tmp.iterdir():
        os.replace(path, directory / path.name)
    tmp.rmdir()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_train_state(output: Path, model: MMRecModel, optimizer: torch.optim.Optimizer, state, step: int,
                     tokens: int, options: FinetuneOptions, extra: dict[str, Any]) -> None:
    """Everything a resume needs, written to train_state.tmp and then swapped in whole."""
    tmp, final, old = output / (TRAIN_STATE + ".tmp"), output / TRAIN_STATE, output / (TRAIN_STATE + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, max_shard_size=options.max_shard_size)  # float32 master weights
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"state": state_to_dict(state) if state is not None else None, "rng": _rng_state()},
               tmp / "recurrent_state.pt")
    _write_json(tmp / "trainer_state.json", {
        "step": step, "tokens": tokens, "settings": options.settings(),
        "schedule": {"kind": "warmup+cosine", "lr": options.lr, "warmup_steps": options.warmup_steps,
                     "num_steps": options.num_steps, "min_lr_ratio": options.min_lr_ratio},
        **extra})
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_train_state(output: Path) -> Path | None:
    for name in (TRAIN_STATE, TRAIN_STATE + ".old"):  # .old: a kill between the two renames
        candidate = output / name
        if (candidate / "trainer_state.json").exists():
            return candidate
    return None


def read_log(output: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    path = output / LOSS_LOG
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if up_to_step is None or record["step"] <= up_to_step:
            records.append(record)
    return records


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """loss.png: training loss (raw and smoothed) and held-out loss against the step. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        smooth = moving_average(list(losses), max(1, len(losses) // 25))
        ax.plot(steps, smooth, color="tab:blue", label="train (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", markersize=3, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def _load_model(options: FinetuneOptions, device: torch.device) -> MMRecModel:
    if options.fresh:
        config_path = options.checkpoint if options.checkpoint.suffix == ".json" else (
            checkpoint_dir(options.checkpoint) / "config.json")
        config = MMRecConfig.load(config_path)
        torch.manual_seed(options.seed)
        model = MMRecModel(config)  # PyTorch default init on CPU: the same values on every device
        return model.to(device)
    model = MMRecModel.from_pretrained(options.checkpoint, device=device, dtype=torch.float32)
    return _own_parameters(model)


def _own_parameters(model: MMRecModel) -> MMRecModel:
    """Detach every parameter from the checkpoint's memory map (the file may be replaced while we train)."""
    for param in model.parameters():  # a tied weight is one Parameter, visited once
        if param.device.type == "cpu":
            param.data = param.data.clone()
    return model


def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _optimizer(model: MMRecModel, options: FinetuneOptions, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def _final_loss(losses: list[float]) -> float:
    """Mean of the last 10% of the step losses (1 to 10 of them): steadier than the very last step."""
    k = min(10, max(1, len(losses) // 10))
    return sum(losses[-k:]) / k


def _prepare_output(options: FinetuneOptions) -> Path | None:
    """Check the output; return the train_state to resume from, if any."""
    output = options.output
    source_dir = checkpoint_dir(options.checkpoint).resolve()
    if output.exists() and output.resolve() == source_dir:
        raise FinetuneRefused(f"{output}: is the checkpoint being fine-tuned; choose another --output")
    if output.exists() and not output.is_dir():
        raise FinetuneRefused(f"{output}: exists and is not a directory")
    state_dir = find_train_state(output) if output.exists() else None
    if options.resume:
        if state_dir is None:
            raise FinetuneRefused(f"{output}: nothing to resume (no {TRAIN_STATE}/ from an earlier run); "
                                  "run without --resume")
        saved = json.loads((state_dir / "trainer_state.json").read_text())
        changed = [name for name, value in options.settings().items() if saved["settings"].get(name) != value]
        if changed:
            raise FinetuneRefused(f"{output}: cannot resume: the run's settings changed ({', '.join(changed)}); "
                                  "rerun with the same settings, or use --overwrite to start again")
        return state_dir
    if output.exists() and any(output.iterdir()):
        if not options.overwrite:
            hint = "--resume to continue it or " if state_dir is not None else ""
            raise FinetuneRefused(f"{output}: exists and is not empty; use {hint}--overwrite to replace it")
        _clear_output(output)
    return None


class _DeferredInterrupt:
    """The first Ctrl-C only asks the loop to stop after the step in flight (so the saved state is whole);
    a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def finetune(options: FinetuneOptions, progress: Callable[[dict[str, Any]], None] | None = None,
             ) -> dict[str, Any]:
    """Train, write the output directory (module docstring) and return the summary."""
    options.validate()
    if options.threads is None:
        return _finetune(options, progress)
    before = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _finetune(options, progress)
    finally:
        torch.set_num_threads(before)


def _finetune(options: FinetuneOptions, progress) -> dict[str, Any]:
    device = resolve_device(options.device)
    if not options.checkpoint.exists():
        raise CheckpointError(f"{options.checkpoint}: no such file or directory")
    if not options.fresh:
        checkpoint_files(options.checkpoint)  # a clear error before anything is read or written
    resume_dir = _prepare_output(options)
    output = options.output

    # Data first: a bad file fails before the model is loaded.
    config = (MMRecConfig.load(options.checkpoint if options.checkpoint.suffix == ".json"
                               else checkpoint_dir(options.checkpoint) / "config.json")
              if options.fresh else checkpoint_files(options.checkpoint)[1])
    tokenizer = load_tokenizer(options.checkpoint, options.tokenizer)
    if tokenizer.vocab_size > config.vocab_size and tokenizer.kind == "bytes":
        raise DataError(f"the byte-level tokenizer needs vocab_size >= 256; the model has {config.vocab_size}")
    train_ids = tokenize_documents(read_documents(options.data, "--data"), tokenizer, config.vocab_size,
                                   options.seed)
    batches = LaneBatches(train_ids, options.batch_size, options.seq_len)
    eval_ids = None
    if options.eval_data:
        eval_ids = tokenize_documents(read_documents(options.eval_data, "--eval-data"), tokenizer,
                                      config.vocab_size, seed=None)
        if eval_ids.numel() < 2:
            raise DataError("the evaluation data has fewer than 2 tokens")

    # Model, optimizer, state.
    if resume_dir is not None:
        model = _own_parameters(MMRecModel.from_pretrained(resume_dir, device=device, dtype=torch.float32))
    else:
        model = _load_model(options, device)
    if options.dropout is not None:
        _set_dropout(model, options.dropout)
    if options.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = _optimizer(model, options, device)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state, start_step, tokens = None, 0, 0
    output.mkdir(parents=True, exist_ok=True)
    if resume_dir is not None:
        saved = json.loads((resume_dir / "trainer_state.json").read_text())
        start_step, tokens = saved["step"], saved["tokens"]
        optimizer.load_state_dict(torch.load(resume_dir / "optimizer.pt", map_location=device, weights_only=True))
        extra = torch.load(resume_dir / "recurrent_state.pt", map_location="cpu", weights_only=True)
        state = state_from_dict(extra["state"], device) if extra["state"] is not None else None
        _set_rng_state(extra["rng"])
        records = read_log(output, up_to_step=start_step)
    else:
        torch.manual_seed(options.seed)
        records = []
    source_dir = checkpoint_dir(options.checkpoint)
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file() and source_dir.resolve() != output.resolve():
            shutil.copyfile(source_dir / name, output / name)

    log = open(output / LOSS_LOG, "w")
    for record in records:
        log.write(json.dumps(record) + "\n")
    log.flush()

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if progress is not None:
            progress(record)

    def run_eval(step: int) -> float | None:
        if eval_ids is None:
            return None
        value = evaluate(model, eval_ids, options.batch_size, options.seq_len, device, options.eval_tokens)
        return value

    vocab = config.vocab_size
    step = start_step
    stop = options.num_steps if options.stop_at is None else min(options.num_steps, options.stop_at)
    train_time = 0.0
    run_tokens = 0
    interrupt = _DeferredInterrupt()
    skips = 0
    try:
        if start_step == 0 and eval_ids is not None:
            emit({"step": 0, "eval_loss": run_eval(0)})
        while step < stop:
            began = time.perf_counter()
            inputs, targets, reset = batches.get(step)
            if reset:
                state = None
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            lr = lr_at(step, options)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device):
                logits, state = model(inputs, state)
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, options.grad_clip or math.inf))
            loss_value = float(loss.detach())
            skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
            if skipped:
                # An overflow (bf16) gives a non-finite gradient now and then: drop that update rather than
                # poison the weights; the state is reset if the forward pass itself overflowed.
                skips += 1
                if skips > MAX_SKIPPED_STEPS:
                    raise TrainingError(f"the loss or its gradient was not finite for {skips} steps in a row "
                                        f"(step {step + 1}); try a lower --lr")
                state = None if not math.isfinite(loss_value) else detach_state(state)
            else:
                skips = 0
                optimizer.step()
                state = detach_state(state)
            step += 1
            tokens += inputs.numel()
            run_tokens += inputs.numel()
            train_time += time.perf_counter() - began
            record = {"step": step, "loss": round(loss_value, 6) if math.isfinite(loss_value) else None,
                      "lr": lr, "tokens": tokens, "grad_norm": round(grad_norm, 5) if math.isfinite(grad_norm) else None,
                      "tokens_per_s": round(run_tokens / train_time, 1)}
            if skipped:
                record["skipped"] = True
            if eval_ids is not None and step < options.num_steps and options.eval_every \
                    and step % options.eval_every == 0:
                record["eval_loss"] = run_eval(step)
            if eval_ids is not None and step == options.num_steps:
                record["eval_loss"] = run_eval(step)
            emit(record)
            if options.save_every and step % options.save_every == 0 and step < stop:
                save_train_state(output, model, optimizer, state, step, tokens, options, {})
            if interrupt.requested:
                # Ctrl-C: the step in flight was finished; keep it and everything before it.
                log.close()
                save_train_state(output, model, optimizer, state, step, tokens, options, {})
                raise KeyboardInterrupt
    finally:
        log.close()
        interrupt.restore()
    save_train_state(output, model, optimizer, state, step, tokens, options, {})

    finished = step >= options.num_steps
    _write_model(model, output, options, dtype=options.save_dtype)
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    skipped_steps = sum(1 for r in records if r.get("skipped"))
    evals = [r for r in records if "eval_loss" in r]
    plotted = plot_losses(records, output / LOSS_PLOT, title=f"fine-tuning {options.checkpoint.name}"
                          + (" (fresh init)" if options.fresh else ""))
    summary = {
        "initial_loss": losses[0] if losses else None,
        "final_loss": _final_loss(losses) if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": step,
        "num_steps": options.num_steps,
        "finished": finished,
        "tokens": tokens,
        "skipped_steps": skipped_steps,
        "initial_eval_loss": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": round(run_tokens / train_time, 1) if train_time else None,
        "train_seconds": round(train_time, 2),
        "resumed_from_step": start_step if resume_dir is not None else None,
        "parameters": model.num_parameters(),
        "device": str(device),
        "tokenizer": tokenizer.kind,
        "train_tokens_available": int(train_ids.numel()),
        "eval_tokens_available": int(eval_ids.numel()) if eval_ids is not None else None,
        "settings": options.settings(),
        "output": str(output),
        "loss_plot": str(output / LOSS_PLOT) if plotted else None,
    }
    _write_json(output / SUMMARY, summary)
    return summary
