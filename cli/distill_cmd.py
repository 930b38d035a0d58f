"""`mmrec distill`: train a converted MM-Rec to behave like its source (layer-wise, then end to end), with
the teacher streamed one layer at a time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EXIT_REFUSED, EXIT_USAGE, clean_errors, fail


def distill(
    teacher: Path = typer.Option(..., "--teacher", metavar="DIR",
                                 help="The source checkpoint (transformers layout, with config.json)."),
    student: Path = typer.Option(..., "--student", metavar="PATH", help="Its MM-Rec conversion (shard-convert "
                                 "output)."),
    data: List[Path] = typer.Option(..., "--data", metavar="PATH", help="Calibration text: .txt, .jsonl "
                                    "({\"text\": ...}) or a directory. Repeat for more."),
    output: Path = typer.Option(..., "--output", metavar="DIR",
                                help="Output directory: the distilled checkpoint and distill_report.json."),
    tokens: int = typer.Option(1_000_000, "--tokens", metavar="N",
                               help="Calibration tokens (cut into --seq-len sequences)."),
    seq_len: int = typer.Option(256, "--seq-len", metavar="N",
                                help="Tokens per calibration sequence (each from a fresh state)."),
    stages: str = typer.Option("mixer,block,e2e", "--stages", metavar="LIST",
                               help="Which stages: mixer, block, e2e (comma-separated)."),
    mixer_steps: int = typer.Option(100, "--mixer-steps", metavar="N",
                                    help="Steps per layer aligning the token mixer with the attention."),
    block_steps: int = typer.Option(100, "--block-steps", metavar="N",
                                    help="Steps per layer aligning the whole block with the layer."),
    e2e_steps: int = typer.Option(200, "--e2e-steps", metavar="N",
                                  help="Steps of end-to-end KL against the teacher's logits."),
    batch_size: int = typer.Option(16, "--batch-size", metavar="N", help="Sequences per step."),
    lr: float = typer.Option(1e-3, "--lr", metavar="LR", help="Peak learning rate of the layer-wise stages."),
    e2e_lr: float = typer.Option(3e-4, "--e2e-lr", metavar="LR", help="Peak learning rate of the end-to-end "
                                 "stage."),
    top_k: int = typer.Option(64, "--top-k", metavar="K", help="Teacher logits kept per position for the KL."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the data order and sampling."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE",
                                         help="cpu, cuda or cuda:N (default: cuda if there)."),
    memory_budget: str = typer.Option("2GB", "--memory-budget", metavar="SIZE",
                                      help="Activations beyond this go to memory-mapped files."),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N", min=1,
                                          help="Train layers as dask tasks on a LocalCluster of N worker "
                                          "processes."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                            help="Train layers as dask tasks on the cluster at ADDRESS."),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", metavar="FILE",
                                                  help="... or on the cluster this file describes."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished layer."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --output."),
    stop_after_layer: Optional[int] = typer.Option(None, "--stop-after-layer", hidden=True,
                                                   help="Stop after this layer as if interrupted (testing resume)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Distil a converted MM-Rec from its source: layer by layer, then end to end on the teacher's logits."""
    from mmrec.shards import parse_size

    try:
        parse_size(memory_budget)
    except ValueError as exc:
        raise fail(f"--memory-budget: {exc}", EXIT_USAGE) from None
    last_print = [0.0]

    def progress(record: dict) -> None:
        if quiet:
            return
        now = time.monotonic()
        if record["event"] == "layer":
            print(f"layer {record['layer'] + 1}/{record['layers']} done in {record['seconds']:.1f}s: mixer MSE "
                  f"{record['mixer_mse_before']:.4f} -> {record['mixer_mse_after']:.4f}, block MSE "
                  f"{record['block_mse_before']:.4f} -> {record['block_mse_after']:.4f}", file=sys.stderr, flush=True)
        elif now - last_print[0] >= 2 or record["step"] == record["steps"]:
            last_print[0] = now
            where = "end-to-end" if record["layer"] is None else f"layer {record['layer'] + 1} {record['stage']}"
            print(f"{where} step {record['step']}/{record['steps']}  loss {record['loss']:.4f}  "
                  f"{record['tokens_per_s']:,.0f} tok/s  ETA {record['eta_s']:.0f}s", file=sys.stderr, flush=True)

    with clean_errors(debug, resumable=True):
        if not quiet and sys.stderr.isatty():  # torch, transformers and the models take seconds: say so
            print(f"loading {teacher} (teacher) and {student} (student) ...", file=sys.stderr, flush=True)
        from mmrec.streaming.distill.run import DistillOptions, DistillRefused
        from mmrec.streaming.graph import SchedulerChoice
        from mmrec.streaming.distill.run import distill as run

        options = DistillOptions(
            teacher=teacher, student=student, data=data, output=output, tokens=tokens, seq_len=seq_len,
            stages=stages, mixer_steps=mixer_steps, block_steps=block_steps, e2e_steps=e2e_steps,
            batch_size=batch_size, lr=lr, e2e_lr=e2e_lr, top_k=top_k, seed=seed, device=device,
            memory_budget=memory_budget, resume=resume,
            scheduler=SchedulerChoice(workers=workers, address=scheduler,
                                      scheduler_file=str(scheduler_file) if scheduler_file else None),
            overwrite=overwrite, stop_after_layer=stop_after_layer)
        try:
            options.validate()
        except ValueError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
        try:
            report = run(options, progress=progress)
        except DistillRefused as exc:
            if debug:
                raise
            raise fail(str(exc), EXIT_REFUSED) from None
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        e2e = report["end_to_end"]
        kl = f", end-to-end KL {e2e['kl_before']:.4f} -> {e2e['kl_after']:.4f}" if e2e.get("steps") else ""
        typer.echo(f"{len(report['layers'])} layers distilled on {report['calibration_tokens']:,} tokens in "
                   f"{report['seconds']:.1f}s{kl}")
        typer.echo(f"wrote {output}")
