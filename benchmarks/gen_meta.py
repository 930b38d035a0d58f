"""Write a synthetic LLaMA checkpoint in Meta's tensor-parallel layout: consolidated.NN.pth + params.json.

    python benchmarks/gen_meta.py OUT --preset 7b [--shards 1]

Names and split dims are those `streaming/sources/meta.py` reads: wq/wk/wv/w1/w3/output split their rows
(dim 0), wo/w2 their columns (dim 1), tok_embeddings its columns (LLaMA 1/2), norms repeated in every
shard. One shard at a time goes through `torch.save`, and its tensors are not in memory: each slice is a
memory map of a random region of a pool file, so `torch.save` streams it from the page cache and anonymous
memory stays small whatever the model size (values are random; shapes, names, dtype and layout are real).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from mmrec.streaming.synthetic import PRESETS

DEFAULT_SHARDS = {"tiny": 2, "small": 2, "1b": 1, "7b": 1, "13b": 2}  # Meta's 7B is MP=1, 13B MP=2
POOL_BYTES = 512 << 20  # larger than any single slice (13b's embedding is 327 MB)
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_tensors(preset: str) -> list[tuple[str, tuple[int, ...]]]:
    vocab, dim, ffn, layers, heads, kv_heads = PRESETS[preset]
    kv = kv_heads * (dim // heads)
    out = [("tok_embeddings.weight", (vocab, dim)), ("norm.weight", (dim,)), ("output.weight", (vocab, dim))]
    for i in range(layers):
        p = f"layers.{i}."
        out += [(p + "attention.wq.weight", (dim, dim)), (p + "attention.wk.weight", (kv, dim)),
                (p + "attention.wv.weight", (kv, dim)), (p + "attention.wo.weight", (dim, dim)),
                (p + "feed_forward.w1.weight", (ffn, dim)), (p + "feed_forward.w2.weight", (dim, ffn)),
                (p + "feed_forward.w3.weight", (ffn, dim)), (p + "attention_norm.weight", (dim,)),
                (p + "ffn_norm.weight", (dim,))]
    return out


def random_block(seed: int, elements: int = 1 << 22) -> bytes:
    """bf16 N(0, 0.02) values, the distribution of `mmrec synth`'s checkpoints."""
    import torch

    values = torch.randn(elements, generator=torch.Generator().manual_seed(seed)) * 0.02
    return values.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def write_pool(path: Path, seed: int) -> None:
    """POOL_BYTES of bf16 N(0, 0.02) values: one random block, tiled with shifts."""
    block = random_block(seed)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        written = 0
        while written < POOL_BYTES:
            shift = int(rng.integers(0, len(block) // 2)) * 2
            piece = block[shift:] + block[:shift]
            f.write(piece[:POOL_BYTES - written])
            written += min(len(piece), POOL_BYTES - written)


def write_meta(out: str | os.PathLike, preset: str = "7b", shards: int | None = None, seed: int = 0) -> Path:
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = shards or DEFAULT_SHARDS[preset]
    vocab, dim, ffn, layers, heads, kv_heads = PRESETS[preset]
    pool_path = out / ".pool.bin"
    write_pool(pool_path, seed)
    rng = np.random.default_rng(seed + 1)
    pool_elements = POOL_BYTES // 2
    try:
        for index in range(shards):
            shard = {}
            for name, shape in meta_tensors(preset):
                kind = name.split(".")[-2]
                if len(shape) == 1:  # norms: repeated, near 1 like trained ones
                    shard[name] = torch.ones(shape, dtype=torch.bfloat16)
                    continue
                dim_split = SPLIT[kind]
                local = list(shape)
                if local[dim_split] % shards:
                    raise ValueError(f"{name} {shape} does not split in {shards} along dim {dim_split}")
                local[dim_split] //= shards
                count = int(np.prod(local))
                start = int(rng.integers(0, pool_elements - count))
                # Its own storage (torch.save writes whole storages), backed by the pool file's pages.
                view = np.memmap(pool_path, dtype=np.int16, mode="r", offset=start * 2, shape=(count,))
                shard[name] = torch.from_numpy(view).view(torch.bfloat16).view(*local)
            torch.save(shard, out / f"consolidated.{index:02d}.pth")
            del shard
    finally:
        pool_path.unlink(missing_ok=True)
    params = {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv_heads, "vocab_size": -1,
              "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0}
    (out / "params.json").write_text(json.dumps(params) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="7b", choices=list(PRESETS))
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_meta(args.out, args.preset, args.shards, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
