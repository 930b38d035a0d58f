"""Synthetic LLaMA-shaped checkpoints in the Hugging Face layout, written shard by shard.

For the demo, tests and benchmarks: real names, real config.json and index, random values, and memory
bounded by one block whatever the model size (values are slices of one random pool, so writing runs at
disk speed instead of random-number speed).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from mmrec.shards import checkpoint_file_paths, group_into_shards, parse_size, shard_names, write_index
from mmrec.safetensors_format import DTYPE_SIZES, layout_header

from .output import REPORT_NAME, STATE_DIR, OutputRefused
from .progress import Progress, human_bytes
from mmrec.shards import TOKENIZER_FILES

PRESETS = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads)
    "tiny": (256, 64, 172, 2, 4, 2),
    "small": (4096, 512, 1376, 4, 8, 8),
    "1b": (32000, 2048, 5632, 22, 32, 4),
    "7b": (32000, 4096, 11008, 32, 32, 32),
    "13b": (32000, 5120, 13824, 40, 40, 40),
}
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_POOL_ELEMENTS = 1 << 22
_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # what a synth or a conversion names its shards
_BLOCK_BYTES = 32 << 20


def _previous_outputs(out: Path) -> list[Path]:
    """What an earlier synth or conversion into `out` leaves: weights, index, config.json, the conversion
    report, tokenizer files and the conversion's state directory (`--overwrite` removes these)."""
    shards = [p for p in checkpoint_file_paths(out) if p.suffix != ".safetensors" or _SHARD_NAME.fullmatch(p.name)]
    paths = [*shards, *(out / n for n in (REPORT_NAME, *TOKENIZER_FILES))]
    paths += [p for p in out.iterdir() if p.name.endswith("." + REPORT_NAME) or p.name == STATE_DIR]
    # only files (and the conversion's state directory): another model's adapter_model.safetensors or a
    # directory that happens to share a name stays
    return [p for p in dict.fromkeys(paths) if p.is_file() or (p.name == STATE_DIR and p.is_dir())]


def _check_not_converting(state: Path) -> None:
    """Refuse to clear a directory a running conversion holds the lock of."""
    lock = state / "lock"
    if not lock.is_file():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputRefused(f"{state.parent}: a conversion is writing to it; refusing to overwrite it") from None
    finally:
        os.close(fd)


def prepare_output(out: Path, overwrite: bool) -> list[str]:
    """Refuse a non-empty `out` unless `overwrite`; then remove what an earlier synth or conversion left
    there. Returns the names of the other files, which are kept."""
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return []
    if not overwrite:
        raise OutputRefused(f"{out}: exists and is not empty; pass --overwrite to replace the checkpoint "
                            "in it, or choose another directory")
    stale = _previous_outputs(out)
    for path in stale:
        if path.is_dir() and path.name.endswith(STATE_DIR):
            _check_not_converting(path)
    for path in stale:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return sorted(p.name for p in out.iterdir())


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
                          max_shard_size: str = "5GB", seed: int = 0, tie: bool = False,
                          overwrite: bool = False, quiet: bool = True, stream=None) -> Path:
    """Write a LLaMA checkpoint of the preset's shape to `out`; returns the directory.

    A non-empty `out` is refused (OutputRefused) unless `overwrite`, which first removes what an earlier
    synth or conversion left there (other files stay). Unless `quiet`, says what it writes and then shows
    shard-convert's progress (bytes, rate, ETA) on `stream` (stderr)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    vocab, hidden, intermediate, layers, heads, kv_heads = PRESETS[preset]
    out = Path(out)
    stream = stream or sys.stderr
    tensors = llama_tensors(vocab, hidden, intermediate, layers, heads, kv_heads, tie)
    size = DTYPE_SIZES[dtype]
    shapes = dict(tensors)
    nbytes = {n: int(np.prod(s)) * size for n, s in tensors}
    groups = group_into_shards([(n, nbytes[n]) for n, _ in tensors], parse_size(max_shard_size))
    kept = prepare_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(nbytes.values())
    if not quiet:
        note = f" (kept {len(kept)} other file{'s' * (len(kept) > 1)}: {', '.join(kept)})" if kept else ""
        print(f"writing a {preset} llama checkpoint to {out}: {human_bytes(total)} in {len(tensors)} tensors, "
              f"{len(groups)} shard{'s' * (len(groups) > 1)}{note}", file=stream, flush=True)
    progress = Progress(total, len(tensors), quiet=quiet, stream=stream, verbs=("writing", "wrote"))
    pool = _random_pool(dtype, seed)
    rng = np.random.default_rng(seed)
    weight_map = {}
    try:
        for file_name, group in zip(shard_names(len(groups)), groups):
            header, offsets = layout_header([(n, dtype, shapes[n]) for n in group], {"format": "pt"})
            with open(out / file_name, "wb") as f:
                f.write(header)
                for name in sorted(group, key=lambda n: offsets[n][0]):
                    if name.endswith("norm.weight"):  # norms near 1, as trained ones are
                        _write_ones(f, nbytes[name] // size, dtype)
                        progress.advance(nbytes[name], 1)
                        continue
                    remaining = nbytes[name]
                    while remaining:
                        take = min(remaining, _BLOCK_BYTES, len(pool) - size)
                        start = int(rng.integers(0, (len(pool) - take) // size)) * size
                        f.write(pool[start:start + take])
                        remaining -= take
                        progress.advance(take, 0 if remaining else 1)
            weight_map.update({n: file_name for n in group})
    finally:
        progress.close()
    if len(groups) > 1:
        write_index(out, weight_map, total)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": tie, "max_position_embeddings": 4096,
              "torch_dtype": DTYPES[dtype]}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _write_ones(f, count: int, dtype: str) -> None:
    import torch

    name = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    f.write(torch.ones(count, dtype=name).view(torch.uint8).numpy().tobytes())
