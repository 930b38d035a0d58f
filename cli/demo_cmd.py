"""`mmrec demo`: the newcomer's first run on a small generated example."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    output: Path = typer.Option(Path("demo-out"), "--output", help="Working directory for the example."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Build a small MM-Rec model, save it as sharded safetensors, load it back lazily and generate."""
    import torch

    from mmrec import MMRecConfig, MMRecModel

    torch.manual_seed(seed)
    config = MMRecConfig(vocab_size=256, model_dim=128, num_layers=4, num_heads=4, memory_slots=64,
                         memory_segment_len=16)
    model = MMRecModel(config)
    checkpoint = output / "mmrec-small"
    model.save_pretrained(checkpoint, max_shard_size="500KB")
    shards = sorted(checkpoint.glob("*.safetensors"))
    typer.echo(f"saved {model.num_parameters():,} parameters in {len(shards)} shards to {checkpoint}")
    loaded = MMRecModel.from_pretrained(checkpoint)
    prompt = torch.tensor([list(b"MM-Rec ")])
    tokens = loaded.generate(prompt, max_new_tokens=16, temperature=0.8, top_k=20,
                             generator=torch.Generator().manual_seed(seed))
    typer.echo(f"generated token ids: {tokens[0, prompt.shape[1]:].tolist()}")
