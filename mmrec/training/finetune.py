"""Fine-tuning the MM-Rec runtime on text (`mmrec finetune`; README.md "Commands", benchmarks/transfer/README.md).

Data: `.txt` files (each one document), `.jsonl` files (one JSON object per line, its `text` field one
document), or directories holding them. Documents are shuffled once (by the seed), tokenized with the
checkpoint's `tokenizer.json` (the `tokenizers` library) or with bytes, joined with an end-of-document
token (or a blank line) and cut into `batch_size` lanes. Each step reads the next `seq_len` tokens of every
lane, and the recurrent state is carried from one step to the next (truncated backpropagation through
time), so a document longer than `seq_len` is read with the context of its earlier chunks. The state is
reset when the lanes wrap round to the start (a new epoch).

Training: AdamW (weight decay on matrices only), linear warmup then cosine decay to `min_lr_ratio * lr`,
gradient clipping, bf16 autocast on CUDA with float32 master weights. The loss backpropagated is the
cross-entropy plus the decay penalty of `stability.DecayGuard` (weight `decay_penalty`, 0 turns it off),
which keeps the carried state from growing geometrically over the run; the logged `loss` is the plain
cross-entropy, and each step's record has `max_abs_h`, the largest |h| of the carried state.

Output directory:
    config.json, model*.safetensors [+ index], tokenizer files   the final model (`from_pretrained(OUT)`)
    loss_log.jsonl, loss.png, finetune_summary.json              the run
    train_state/   model + optimizer.pt + recurrent_state.pt + trainer_state.json (step, schedule,
                   RNG states): what `resume=True` continues from, to the same loss sequence.

Part of the runtime (`mmrec.training`): never imports dask, typer or transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, checkpoint_file_paths, checkpoint_files, parse_size, torch_dtype
from ..shards import TOKENIZER_FILES
from ..config import MMRecConfig
from ..model import MMRecModel
from .data import (LaneBatches, checkpoint_dir, load_tokenizer, read_documents,
                   tokenize_documents)
from .device import DeferredInterrupt, autocast, detach_state, resolve_device, set_rng_state, state_from_dict
from .errors import DataError, FinetuneRefused, TrainingError
from .evaluate import evaluate
from .outputs import (LOSS_LOG, LOSS_PLOT, TRAIN_STATE, find_train_state, plot_losses, read_log,
                      save_train_state, write_json, write_model)
from .schedule import lr_at, make_optimizer
from .stability import DecayGuard

SUMMARY = "finetune_summary.json"
MAX_SKIPPED_STEPS = 5  # non-finite loss or gradient this many steps in a row is an error
# Settings that define a run: a resume with any of them changed is refused.
RUN_SETTINGS = ("checkpoint", "data", "fresh", "num_steps", "lr", "batch_size", "seq_len", "warmup_steps",
                "min_lr_ratio", "weight_decay", "grad_clip", "dropout", "seed", "tokenizer", "decay_penalty")
# What a train_state saved before a setting existed ran with (compared on resume in place of the missing value).
LEGACY_SETTINGS = {"decay_penalty": 0.0}


def float_option_problem(options) -> str | None:
    """The first float option of `options` that is not finite or out of its range, as one line (else None)."""
    checks = (("lr", "a finite number greater than 0", lambda v: v > 0),
              ("min_lr_ratio", "a finite number in [0, 1]", lambda v: 0 <= v <= 1),
              ("weight_decay", "a finite number >= 0", lambda v: v >= 0),
              ("grad_clip", "a finite number >= 0 (0: off)", lambda v: v >= 0),
              ("dropout", "a finite number in [0, 1)", lambda v: 0 <= v < 1))
    for name, what, ok in checks:
        value = getattr(options, name, None)
        if value is None:
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            return f"--{name.replace('_', '-')} must be {what}, got {value}"
    return None


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
    save_dtype: str | None = None  # dtype of the final model; default: the checkpoint's (config torch_dtype)
    tokenizer: str = "auto"  # "auto": tokenizer.json beside the checkpoint, else bytes; or "bytes"
    stop_at: int | None = None  # stop after this step as if interrupted (leaves a resumable state)
    threads: int | None = None  # CPU threads for torch during the run (default: torch's)
    decay_penalty: float = 10.0  # weight of the DecayGuard penalty on γ > 9/11 (0: no guard)

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
        problem = float_option_problem(self)
        if problem:
            raise ValueError(problem)
        if not (math.isfinite(self.decay_penalty) and self.decay_penalty >= 0):
            raise ValueError(f"decay_penalty must be a finite number >= 0, got {self.decay_penalty}")
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


def _refuse_other_checkpoints(checkpoint: Path) -> None:
    """A Hugging Face folder (config.json of another model_type) gets the command that converts it."""
    config_path = checkpoint if checkpoint.suffix == ".json" else checkpoint_dir(checkpoint) / "config.json"
    if checkpoint.is_file() and checkpoint.suffix == ".safetensors":
        from ..checkpoint import CONFIG_METADATA_KEY, read_header

        try:
            if CONFIG_METADATA_KEY in read_header(checkpoint).metadata:
                return  # a single file carrying its own MM-Rec config: that config wins
        except (OSError, ValueError):
            return  # the loader names the problem
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError):
        return  # missing or unreadable: the loader names the problem
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None or model_type == "mmrec":
        return
    source = checkpoint_dir(checkpoint) if checkpoint.suffix == ".json" else checkpoint
    target = source.parent / (source.name.removesuffix(".safetensors") + "-mmrec")
    raise CheckpointError(f"{checkpoint}: is a {model_type!r} checkpoint, not MM-Rec; convert it first with "
                          f"`mmrec shard-convert --source {shlex.quote(str(source))} --output "
                          f"{shlex.quote(str(target))}` and fine-tune the result")


def _stored_dtype(config: MMRecConfig) -> str:
    """The default dtype of the final model: the checkpoint's own (a bf16 conversion stays bf16, half the
    bytes of float32), from its config's torch_dtype; float32 when that names no floating dtype."""
    try:
        dtype = torch_dtype(config.torch_dtype) if config.torch_dtype else torch.float32
    except (ValueError, TypeError):
        dtype = torch.float32
    kept = (torch.bfloat16, torch.float16, torch.float32)  # never a lossy float8 or a float64 by default
    return str(dtype if dtype in kept else torch.float32).replace("torch.", "")


def _clear_output(output: Path) -> None:
    """--overwrite: remove what a fine-tuning run writes, and nothing else."""
    for path in checkpoint_file_paths(output):
        path.unlink()
    for name in (*TOKENIZER_FILES, LOSS_LOG, LOSS_PLOT, SUMMARY):
        (output / name).unlink(missing_ok=True)
    for name in (TRAIN_STATE, TRAIN_STATE + ".tmp", TRAIN_STATE + ".old"):
        shutil.rmtree(output / name, ignore_errors=True)


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


def _save_train_state(output: Path, model: MMRecModel, optimizer: torch.optim.Optimizer, state, step: int,
                      tokens: int, options: FinetuneOptions) -> None:
    save_train_state(output, model, optimizer, state, {
        "step": step, "tokens": tokens, "settings": options.settings(),
        "schedule": {"kind": "warmup+cosine", "lr": options.lr, "warmup_steps": options.warmup_steps,
                     "num_steps": options.num_steps, "min_lr_ratio": options.min_lr_ratio}},
        options.max_shard_size)


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
        changed = [name for name, value in options.settings().items()
                   if saved["settings"].get(name, LEGACY_SETTINGS.get(name)) != value]
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
    _refuse_other_checkpoints(options.checkpoint)
    if not options.fresh:
        checkpoint_files(options.checkpoint)  # a clear error before anything is read or written
    resume_dir = _prepare_output(options)
    output = options.output

    # Data first: a bad file fails before the model is loaded.
    config = (MMRecConfig.load(options.checkpoint if options.checkpoint.suffix == ".json"
                               else checkpoint_dir(options.checkpoint) / "config.json")
              if options.fresh else checkpoint_files(options.checkpoint)[1])
    save_dtype = options.save_dtype or _stored_dtype(config)
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
    guard = DecayGuard(list(model.blocks), options.decay_penalty) if options.decay_penalty > 0 else None
    optimizer = make_optimizer(model, options.lr, options.weight_decay, device)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state, start_step, tokens = None, 0, 0
    output.mkdir(parents=True, exist_ok=True)
    if resume_dir is not None:
        saved = json.loads((resume_dir / "trainer_state.json").read_text())
        start_step, tokens = saved["step"], saved["tokens"]
        optimizer.load_state_dict(torch.load(resume_dir / "optimizer.pt", map_location=device, weights_only=True))
        extra = torch.load(resume_dir / "recurrent_state.pt", map_location="cpu", weights_only=True)
        state = state_from_dict(extra["state"], device) if extra["state"] is not None else None
        set_rng_state(extra["rng"])
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
    interrupt = DeferredInterrupt()
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
            lr = lr_at(step, options.warmup_steps, options.num_steps, options.lr, options.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                logits, state = model(inputs, state)
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
            max_abs_h = max(float(s.h.detach().abs().max()) for s in state)
            total = loss + guard.penalty() if guard is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
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
                      "lr": lr, "tokens": tokens,
                      "grad_norm": round(grad_norm, 5) if math.isfinite(grad_norm) else None,
                      "tokens_per_s": round(run_tokens / train_time, 1),
                      "max_abs_h": max_abs_h if math.isfinite(max_abs_h) else None}
            if skipped:
                record["skipped"] = True
            if eval_ids is not None and step < options.num_steps and options.eval_every \
                    and step % options.eval_every == 0:
                record["eval_loss"] = run_eval(step)
            if eval_ids is not None and step == options.num_steps:
                record["eval_loss"] = run_eval(step)
            emit(record)
            if options.save_every and step % options.save_every == 0 and step < stop:
                _save_train_state(output, model, optimizer, state, step, tokens, options)
            if interrupt.requested:
                # Ctrl-C: the step in flight was finished; keep it and everything before it.
                log.close()
                _save_train_state(output, model, optimizer, state, step, tokens, options)
                raise KeyboardInterrupt
    finally:
        log.close()
        interrupt.restore()
        if guard is not None:
            guard.close()
    _save_train_state(output, model, optimizer, state, step, tokens, options)

    finished = step >= options.num_steps
    write_model(model, output, options.max_shard_size, dtype=save_dtype)
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    skipped_steps = sum(1 for r in records if r.get("skipped"))
    evals = [r for r in records if "eval_loss" in r]
    state_sizes = [r["max_abs_h"] for r in records if r.get("max_abs_h") is not None]
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
        "max_abs_h": max(state_sizes) if state_sizes else None,
        "initial_eval_loss": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": round(run_tokens / train_time, 1) if train_time else None,
        "train_seconds": round(train_time, 2),
        "resumed_from_step": start_step if resume_dir is not None else None,
        "parameters": model.num_parameters(),
        "device": str(device),
        "save_dtype": str(torch_dtype(save_dtype)).replace("torch.", ""),  # the final model's
        "tokenizer": tokenizer.kind,
        "train_tokens_available": int(train_ids.numel()),
        "eval_tokens_available": int(eval_ids.numel()) if eval_ids is not None else None,
        "settings": options.settings(),
        "output": str(output),
        "loss_plot": str(output / LOSS_PLOT) if plotted else None,
    }
    write_json(output / SUMMARY, summary)
    return summary
