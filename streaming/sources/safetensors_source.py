"""Safetensors layouts: one file, a directory of files, or a directory with model.safetensors.index.json."""

from __future__ import annotations

from pathlib import Path

from mmrec.safetensors_format import SafetensorsFormatError, read_header

from .catalog import Piece, SourceError, SourceTensor, contiguous_strides, load_json, normalize_name
from .paths import resolve_in_dir


def files_from_index(index_path: Path) -> tuple[list[Path], dict[str, Path]]:
    """Weight files named by an HF index (in first-mention order) and its name -> file map."""
    index = load_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: has no 'weight_map' object")
    files: dict[Path, None] = {}
    by_name: dict[str, Path] = {}
    resolved: dict[str, Path] = {}
    for tensor_name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise SourceError(f"{index_path}: tensor '{tensor_name[:200]}' maps to {str(file_name)[:80]!r}, "
                              "not a file name")
        if file_name not in resolved:
            resolved[file_name] = resolve_in_dir(index_path, file_name)
        by_name[tensor_name] = resolved[file_name]
        files.setdefault(resolved[file_name])
    return list(files), by_name


def safetensors_entries(files: list[Path]) -> list[SourceTensor]:
    """One SourceTensor per header entry, in file order then data order."""
    out = []
    for path in files:
        try:
            header = read_header(path)
        except SafetensorsFormatError as exc:
            raise SourceError(str(exc)) from None
        for span in header.tensors.values():
            piece = Piece(str(path), span.start, span.shape, contiguous_strides(span.shape))
            out.append(SourceTensor(normalize_name(span.name), span.name, span.dtype, span.shape, (piece,), None))
    return out


def check_index_matches(index_path: Path, by_name: dict[str, Path], entries: list[SourceTensor]) -> None:
    """Every tensor the index lists must be in the file it names (a stale index is an error)."""
    where = {(t.original_name, t.pieces[0].file) for t in entries}
    for name, file in by_name.items():
        if (name, str(file)) not in where:
            raise SourceError(f"{index_path}: lists tensor '{name}' in {file.name}, but that file has no such "
                              "tensor")
