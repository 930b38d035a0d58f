"""`mmrec demo` and `mmrec synth`: the newcomer's first run, on a generated example."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from .errors import clean_errors


def synth(
    output: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    preset: str = typer.Option("tiny", "--preset", help="Shape: tiny, small, 1b, 7b or 13b."),
    dtype: str = typer.Option("BF16", "--dtype", help="BF16, F16 or F32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a LLaMA-shaped checkpoint (Hugging Face layout, random values), shard by shard."""
    with clean_errors():
        from mmrec.streaming.synthetic import write_synthetic_llama

        write_synthetic_llama(output, preset, dtype, max_shard_size, seed)
    typer.echo(f"wrote a {preset} llama checkpoint to {output}")


def demo(
    output: Path = typer.Option(Path("demo-out"), "--output", help="Working directory for the example."),
) -> None:
    """Generate a tiny LLaMA checkpoint, convert it with shard-convert, load the result and generate."""
    import torch

    from mmrec import MMRecModel
    from mmrec.streaming.convert import ConvertOptions, convert
    from mmrec.streaming.report import summary_text
    from mmrec.streaming.synthetic import write_synthetic_llama

    source, converted = output / "tiny-llama", output / "tiny-mmrec"
    shutil.rmtree(output, ignore_errors=True)
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
