"""PyTorch layouts: one .pt/.pth/.bin zip file, or shards listed by pytorch_model.bin.index.json."""

from __future__ import annotations

from pathlib import Path

from .catalog import SourceTensor, normalize_name
from .safetensors_source import files_from_index  # same index format as safetensors
from .torch_zip import read_torch_zip

INDEX_NAME = "pytorch_model.bin.index.json"
SUFFIXES = (".pt", ".pth", ".bin")


def torch_entries(files: list[Path]) -> list[SourceTensor]:
    out = []
    for path in files:
        for name, dtype, shape, piece in read_torch_zip(path):
            out.append(SourceTensor(normalize_name(name), name, dtype, shape, (piece,), None))
    return out


__all__ = ["INDEX_NAME", "SUFFIXES", "files_from_index", "torch_entries"]
