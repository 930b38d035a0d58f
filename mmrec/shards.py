"""Checkpoint files without torch: names, sizes, sharding and the index (docs/checkpoint-format.md "Files
of a checkpoint directory"). Header-only tools (inspect, plan, verify, the engine's layout) use these
without importing torch."""

from __future__ import annotations

import json
import re
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_METADATA_KEY = "mmrec_config"  # config.json copy inside the safetensors metadata (single files)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units; KiB/MiB/GiB are binary). Must be positive."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"invalid size {text!r}: use a number with an optional unit, e.g. 5GB or 500MB")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be greater than 0")
    return value


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def group_into_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in order: a shard closes when the next tensor would overflow it; a tensor larger than the
    limit gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


# The tokenizer and generation files that sit beside a checkpoint's weights: a conversion copies them,
# fine-tuning and distillation carry them to their outputs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.json", "chat_template.jinja", "tokenizer.tiktoken")


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """The text of a sharded checkpoint's index (transformers' layout: tensor name -> shard file name)."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n"


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    (directory / INDEX_NAME).write_text(index_json(weight_map, total_size))


def checkpoint_file_paths(directory: Path) -> list[Path]:
    """The files a checkpoint directory's loader would read: shards, index and config.json."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("config.json", INDEX_NAME))]
