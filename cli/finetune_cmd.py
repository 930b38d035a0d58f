"""`mmrec finetune`: train the runtime from a converted (or fresh) checkpoint on text files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EXIT_REFUSED, EXIT_USAGE, clean_errors, fail


def finetune(
    checkpoint: Path = typer.Option(..., "--checkpoint", metavar="PATH",
                                    help="MM-Rec checkpoint (directory or .safetensors), e.g. shard-convert's "
                                    "output. With --fresh only its config.json (and tokenizer) are used."),
    data: List[Path] = typer.Option(..., "--data", metavar="PATH", help="Training text: .txt (one document per "
                                    "file), .jsonl ({\"text\": ...} per line) or a directory of them. Repeat for "
                                    "more."),
    num_steps: int = typer.Option(..., "--num-steps", "--num_steps", metavar="N", min=1,
                                  help="Optimizer steps in the run."),
    output: Path = typer.Option(..., "--output", metavar="DIR",
                                help="Output directory (model, train_state/, loss log, plot)."),
    lr: float = typer.Option(3e-4, "--lr", metavar="LR", help="Peak learning rate (after warmup; cosine decay "
                             "after it)."),
    batch_size: int = typer.Option(8, "--batch-size", "--batch_size", metavar="N", min=1,
                                   help="Sequences per step (lanes)."),
    seq_len: int = typer.Option(128, "--seq-len", "--seq_len", metavar="N", min=1,
                                help="Tokens per lane per step; the recurrent state carries over between steps."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE",
                                         help="cpu, cuda or cuda:N (default: cuda if there)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute blocks in backward."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --output."),
    fresh: bool = typer.Option(False, "--fresh", help="Start from a fresh init of the checkpoint's config."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the data order, dropout and --fresh init."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", metavar="N", min=0,
                                               help="Linear warmup steps (default: 10% of the steps, at most 100)."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", metavar="X", help="Cosine floor as a fraction of "
                                       "--lr."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", metavar="X", help="AdamW weight decay (matrices "
                                       "only)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", metavar="X", help="Gradient norm clipping (0: off)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", metavar="P",
                                            help="Dropout while training (default: the config's; a conversion's "
                                            "is 0)."),
    eval_data: Optional[List[Path]] = typer.Option(None, "--eval-data", metavar="PATH",
                                                   help="Held-out text, same formats as --data."),
    eval_every: int = typer.Option(0, "--eval-every", metavar="N", min=0,
                                   help="Held-out loss every N steps (and at the ends)."),
    eval_tokens: int = typer.Option(262144, "--eval-tokens", metavar="N", min=1,
                                    help="At most this many held-out tokens."),
    save_every: int = typer.Option(0, "--save-every", metavar="N", min=0,
                                   help="Write a resumable state every N steps."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", metavar="SIZE",
                                       help="Largest safetensors shard."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", metavar="DTYPE",
                                             help="dtype of the final model: bfloat16, float16 or float32 "
                                             "(default: the checkpoint's, its config.json torch_dtype)."),
    tokenizer: str = typer.Option("auto", "--tokenizer", metavar="KIND", help="auto (tokenizer.json beside the "
                                  "checkpoint, else bytes) or bytes."),
    threads: Optional[int] = typer.Option(None, "--threads", metavar="N", min=1,
                                          help="CPU threads for torch (default: torch's)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", metavar="N", min=1,
                                            help="Progress line every N steps."),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", min=1, hidden=True,
                                          help="Stop after this step as if interrupted (testing resume)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Fine-tune an MM-Rec checkpoint on text (.txt / .jsonl): AdamW, warmup + cosine, carried state."""
    from mmrec.shards import parse_size

    try:
        parse_size(max_shard_size)
    except ValueError as exc:
        raise fail(f"--max-shard-size: {exc}", EXIT_USAGE) from None
    from types import SimpleNamespace

    from mmrec.training.finetune import float_option_problem

    problem = float_option_problem(SimpleNamespace(lr=lr, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                                                   grad_clip=grad_clip, dropout=dropout))
    if problem:
        raise fail(problem, EXIT_USAGE)
    if tokenizer not in ("auto", "bytes"):
        raise fail(f"--tokenizer must be auto or bytes, got {tokenizer!r}", EXIT_USAGE)
    if save_dtype is not None:
        from mmrec.checkpoint import torch_dtype

        try:
            torch_dtype(save_dtype)
        except ValueError as exc:
            raise fail(f"--save-dtype: {exc}", EXIT_USAGE) from None
    every = log_every or max(1, num_steps // 50)

    def progress(record: dict) -> None:
        if quiet:
            return
        if "loss" not in record:
            print(f"step {record['step']:>6}/{num_steps}  held-out loss {record['eval_loss']:.4f}", file=sys.stderr)
            return
        if record["step"] % every and record["step"] != num_steps and "eval_loss" not in record:
            return
        if record.get("skipped"):
            print(f"step {record['step']:>6}/{num_steps}  non-finite loss or gradient: update skipped",
                  file=sys.stderr, flush=True)
            return
        line = (f"step {record['step']:>6}/{num_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['tokens_per_s']:,.0f} tok/s")
        if "eval_loss" in record:
            line += f"  held-out {record['eval_loss']:.4f}"
        print(line, file=sys.stderr, flush=True)

    with clean_errors(debug, resumable=True):
        if not quiet and sys.stderr.isatty():  # torch and the model take seconds: say so at a terminal
            print(f"loading {checkpoint} ...", file=sys.stderr, flush=True)
        from mmrec.training.finetune import FinetuneOptions, FinetuneRefused
        from mmrec.training.finetune import finetune as run

        options = FinetuneOptions(
            checkpoint=checkpoint, data=data, num_steps=num_steps, output=output, lr=lr, batch_size=batch_size,
            seq_len=seq_len, device=device, grad_checkpointing=grad_checkpointing, resume=resume,
            overwrite=overwrite, fresh=fresh, seed=seed, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
            weight_decay=weight_decay, grad_clip=grad_clip, dropout=dropout, eval_data=eval_data or [],
            eval_every=eval_every, eval_tokens=eval_tokens, save_every=save_every, max_shard_size=max_shard_size,
            save_dtype=save_dtype, tokenizer=tokenizer, stop_at=stop_at, threads=threads)
        try:
            summary = run(options, progress=progress)
        except FinetuneRefused as exc:
            if debug:
                raise
            raise fail(str(exc), EXIT_REFUSED) from None
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    else:
        held_out = (f", held-out {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}"
                    if summary["final_eval_loss"] is not None and summary["initial_eval_loss"] is not None else "")
        typer.echo(f"{summary['steps']} steps, {summary['tokens']:,} tokens: loss {summary['initial_loss']:.4f} -> "
                   f"{summary['final_loss']:.4f}{held_out}")
        typer.echo(f"wrote {output}" + ("" if summary["finished"] else " (stopped early; --resume continues)"))
