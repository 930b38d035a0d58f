"""`mmrec demo` and `mmrec synth`: the newcomer's first run, on a generated example."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import typer

from .errors import EXIT_REFUSED, EXIT_USAGE, clean_errors, fail

SYNTH_DTYPES = ("BF16", "F16", "F32")
DEMO_DIRS = ("tiny-llama", "tiny-mmrec")


def synth(
    output: Path = typer.Argument(..., metavar="DIR", show_default=False,
                                  help="Directory to write the checkpoint to (new or empty, or --overwrite)."),
    preset: str = typer.Option("tiny", "--preset", metavar="NAME",
                               help="Shape: tiny, small, 1b (2.2 GB in bf16), 7b or 13b."),
    dtype: str = typer.Option("BF16", "--dtype", metavar="DTYPE", help="BF16, F16 or F32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", metavar="SIZE",
                                       help="Largest shard, e.g. 500MB or 5GB."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the random values."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Write into a non-empty DIR: first remove the weights, index, config, "
                                        "tokenizer files and report an earlier synth or conversion left there."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Write a LLaMA-shaped checkpoint (Hugging Face layout, random values), shard by shard."""
    from mmrec.shards import parse_size
    from mmrec.streaming.synthetic import PRESETS

    if preset not in PRESETS:
        raise fail(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", EXIT_USAGE)
    from mmrec.streaming.plan.model import PlanError
    from mmrec.streaming.plan.target import dtype_code

    try:
        code = dtype_code(dtype)  # the one dtype-name table: bf16, bfloat16, torch.float16, F32, ...
    except PlanError:
        code = None
    if code not in SYNTH_DTYPES:
        raise fail(f"--dtype: unknown dtype {dtype!r}; choose one of BF16, F16 or F32", EXIT_USAGE)
    try:
        parse_size(max_shard_size)
    except ValueError as exc:
        raise fail(f"--max-shard-size: {exc}", EXIT_USAGE) from None
    with clean_errors(debug):
        from mmrec.streaming.synthetic import write_synthetic_llama

        write_synthetic_llama(output, preset, code, max_shard_size, seed, overwrite=overwrite, quiet=quiet)
    typer.echo(f"wrote a {preset} llama checkpoint to {output}")


def demo(
    output: Path = typer.Option(Path("demo-out"), "--output", metavar="DIR",
                                help="Working directory for the example. An earlier demo's checkpoints "
                                     "in it are replaced; a directory holding other files is refused."),
) -> None:
    """Generate a tiny LLaMA checkpoint, convert it, load the result and generate a few tokens."""
    with clean_errors():
        if output.exists() and not output.is_dir():
            raise fail(f"--output {output}: exists and is not a directory", EXIT_REFUSED)
        others = sorted(p.name for p in output.iterdir() if p.name not in DEMO_DIRS) if output.exists() else []
        if others:
            raise fail(f"--output {output}: holds files the demo did not write ({', '.join(others[:3])}"
                       f"{', ...' if len(others) > 3 else ''}); choose another --output", EXIT_REFUSED)
        print(f"mmrec demo in {output}: loading torch ...", file=sys.stderr, flush=True)
        import torch

        from mmrec import MMRecModel
        from mmrec.streaming.convert import ConvertOptions, convert
        from mmrec.streaming.report import summary_text
        from mmrec.streaming.synthetic import write_synthetic_llama

        source, converted = output / DEMO_DIRS[0], output / DEMO_DIRS[1]
        for directory in (source, converted):  # an earlier demo's
            if directory.is_dir() and not directory.is_symlink():
                shutil.rmtree(directory)
            elif directory.exists() or directory.is_symlink():
                directory.unlink()
        write_synthetic_llama(source, "tiny", "BF16", max_shard_size="100KB")
        typer.echo(f"1. wrote a tiny llama checkpoint to {source}  (mmrec synth {source} --preset tiny)")
        typer.echo(f"2. mmrec shard-convert --source {source} --output {converted} --max-shard-size 100KB")
        report = convert(ConvertOptions(source=source, output=converted, max_shard_size="100KB"))
        typer.echo(summary_text(report))
        model = MMRecModel.from_pretrained(converted)
        prompt = torch.tensor([[1, 2, 3, 4]])
        tokens = model.generate(prompt, max_new_tokens=12, temperature=0.8, top_k=20,
                                generator=torch.Generator().manual_seed(0))
        typer.echo(f"3. loaded {model.num_parameters():,} parameters with MMRecModel.from_pretrained; "
                   f"generated token ids: {tokens[0, prompt.shape[1]:].tolist()}")
        typer.echo(f"   check it: mmrec verify {converted} --source {source}")
