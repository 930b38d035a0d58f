"""Synthetic LLaMA-shaped checkpoints in the Hugging Face layout, written shard by shard.

For the demo, tests and benchmarks: real names, real config.json and index, random values, and memory
bounded by one block whatever the model size (values are slices of one random pool, so writing runs at
disk speed instead of random-number speed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mmrec.shards import group_into_shards, parse_size, shard_names, write_index
from mmrec.safetensors_format import DTYPE_SIZES, layout_header

PRESETS = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads)
    "tiny": (256, 64, 172, 2, 4, 2),
    "small": (4096, 512, 1376, 4, 8, 8),
    "1b": (32000, 2048, 5632, 22, 32, 4),
    "7b": (32000, 4096, 11008, 32, 32, 32),
    "13b": (32000, 5120, 13824, 40, 40, 40),
}
_POOL_ELEMENTS = 1 << 22
_BLOCK_BYTES = 32 << 20


def llama_tensors(vocab, hidden, intermediate, layers, heads, kv_heads, tie=False) -> list[tuple[str, tuple]]:
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
                (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)),
                (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    out.append(("model.norm.weight", (hidden,)))
    if not tie:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def _random_pool(dtype: str, seed: int) -> bytes:
    import torch

    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(_POOL_ELEMENTS, generator=generator) * 0.02
    name = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    return values.to(name).view(torch.uint8).numpy().tobytes()


def write_synthetic_llama(out: str | os.PathLike, preset: str = "tiny", dtype: str = "BF16",
                          max_shard_size: str = "5GB", seed: int = 0, tie: bool = False) -> Path:
    """Write a LLaMA checkpoint of the preset's shape to `out`; returns the directory."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    vocab, hidden, intermediate, layers, heads, kv_heads = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(vocab, hidden, intermediate, layers, heads, kv_heads, tie)
    size = DTYPE_SIZES[dtype]
    shapes = dict(tensors)
    nbytes = {n: int(np.prod(s)) * size for n, s in tensors}
    groups = group_into_shards([(n, nbytes[n]) for n, _ in tensors], parse_size(max_shard_size))
    pool = _random_pool(dtype, seed)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for file_name, group in zip(shard_names(len(groups)), groups):
        header, offsets = layout_header([(n, dtype, shapes[n]) for n in group], {"format": "pt"})
        with open(out / file_name, "wb") as f:
            f.write(header)
            for name in sorted(group, key=lambda n: offsets[n][0]):
                if name.endswith("norm.weight"):  # norms near 1, as trained ones are
                    _write_ones(f, nbytes[name] // size, dtype)
                    continue
                remaining = nbytes[name]
                while remaining:
                    take = min(remaining, _BLOCK_BYTES, len(pool) - size)
                    start = int(rng.integers(0, (len(pool) - take) // size)) * size
                    f.write(pool[start:start + take])
                    remaining -= take
        weight_map.update({n: file_name for n in group})
    if len(groups) > 1:
        write_index(out, weight_map, sum(nbytes.values()))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": tie, "max_position_embeddings": 4096,
              "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _write_ones(f, count: int, dtype: str) -> None:
    import torch

    name = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    f.write(torch.ones(count, dtype=name).view(torch.uint8).numpy().tobytes())
