"""Memory-mapped sources: `open_source(path)` detects a checkpoint's layout and catalogs its tensors.

A URL source (`https://...`, `hf://org/name[@revision]`) is cataloged by `remote.py` instead, imported
only then: its tensors are read with HTTP range requests (docs/remote.md)."""

from __future__ import annotations

import os
from pathlib import Path

from mmrec.shards import INDEX_NAME

from . import meta, safetensors_source, torch_source
from .catalog import (Piece, SourceCatalog, SourceError, SourceTensor, build_tensors, find_aux_files,
                      load_json, normalize_name)
from .paths import check_inside_dir, check_not_lfs_pointer, check_regular_file, remote_url

__all__ = ["open_source", "SourceCatalog", "SourceError", "SourceTensor", "Piece", "normalize_name", "remote_url"]

# Files a training run leaves next to the weights that are pickles of other things, not weights.
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "optimizer.bin"}


def open_source(path: str | os.PathLike) -> SourceCatalog:
    """Catalog a checkpoint from its headers only (no tensor data read, torch not imported)."""
    url = remote_url(path)
    if url is not None:
        from .remote import open_remote

        return open_remote(url)
    path = Path(path).absolute()
    if not path.exists():
        raise SourceError(f"{path}: does not exist")
    if path.is_dir():
        root, layout, files, index = _detect_dir(path)
    elif not path.is_file():
        check_regular_file(path)  # a FIFO, socket or device named as the source: refused, never opened
    else:
        root, layout, files, index = _detect_file(path)

    aux_files = find_aux_files(root)
    explicit = path if path.is_file() else None  # a file the user named may live anywhere
    for f in [*files, *aux_files, root / "config.json", root / "params.json"]:
        if f != explicit and (f.is_symlink() or f.exists()):
            check_inside_dir(root, f)
        if f in files or f.exists():
            check_regular_file(f)  # before anything opens it: a FIFO would block the open forever
    config = None
    if layout == "meta":
        config = load_json(root / "params.json")
        entries = meta.meta_entries(files, config)
    else:
        if (root / "config.json").is_file():
            config = load_json(root / "config.json")
        for f in files:
            check_not_lfs_pointer(f)
        if layout == "safetensors":
            entries = safetensors_source.safetensors_entries(files)
        else:
            entries = torch_source.torch_entries(files)
        if index is not None:
            safetensors_source.check_index_matches(index[0], index[1], entries)
    if not entries:
        raise SourceError(f"{path}: holds no tensors")
    tensors = build_tensors(entries, lambda t: Path(t.pieces[0].file).name)
    return SourceCatalog(root, layout, files, tensors, config, aux_files)


def _detect_file(path: Path):
    root = path.parent
    name = path.name
    if name.endswith(".index.json"):
        files, by_name = safetensors_source.files_from_index(path)
        layout = "safetensors" if all(f.suffix == ".safetensors" for f in files) else "torch"
        if layout == "torch" and not all(f.suffix in torch_source.SUFFIXES for f in files):
            raise SourceError(f"{path}: mixes safetensors and other files")
        return root, layout, files, (path, by_name)
    if path.suffix == ".safetensors":
        return root, "safetensors", [path], None
    if meta.SHARD_RE.match(name) and (root / "params.json").is_file():
        return root, "meta", meta.meta_shards(root), None
    if path.suffix in torch_source.SUFFIXES:
        return root, "torch", [path], None
    check_not_lfs_pointer(path)
    raise SourceError(f"{path}: not a checkpoint file (expected .safetensors, .pt, .pth, .bin or an "
                      "index .json)")


def _detect_dir(root: Path):
    st_index = root / INDEX_NAME
    if st_index.is_file():
        return _detect_file(st_index)
    st_files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if st_files:
        return root, "safetensors", st_files, None
    bin_index = root / torch_source.INDEX_NAME
    if bin_index.is_file():
        return _detect_file(bin_index)
    shards = meta.meta_shards(root)
    if shards:
        if not (root / "params.json").is_file():
            raise SourceError(f"{root}: has Meta shards ({shards[0].name} ...) but no params.json")
        return root, "meta", shards, None
    if (root / "pytorch_model.bin").is_file():
        return root, "torch", [root / "pytorch_model.bin"], None
    torch_files = sorted(p for p in root.iterdir()
                         if p.is_file() and p.suffix in torch_source.SUFFIXES and p.name not in NOT_WEIGHTS
                         and not p.name.startswith("rng_state"))
    if torch_files:
        return root, "torch", torch_files, None
    raise SourceError(f"{root}: no weights found (expected *.safetensors, model.safetensors.index.json, "
                      "pytorch_model.bin[.index.json], *.pt/*.pth/*.bin or consolidated.NN.pth + params.json)")
