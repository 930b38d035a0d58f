"""Sharded safetensors checkpoints (docs/checkpoint-format.md): save, and load lazily.

Loading builds the model on the meta device and fills it tensor by tensor: on CPU each parameter is a view
of a private (copy-on-write) memory map, so nothing is copied; on a GPU the files stream through two small
pinned buffers (device_load.py), so the host never holds the model.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import MMRecConfig
from .init import conversion_init
from .safetensors_format import (DTYPE_SIZES, TensorSpan, layout_header, read_header, safetensors_code,
                                 torch_dtype)
from .schema import parameter_specs
from .shards import (CONFIG_METADATA_KEY, INDEX_NAME, SINGLE_NAME, checkpoint_file_paths,  # noqa: F401
                     group_into_shards, parse_size, shard_names, write_index)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists what is wrong."""


def save_pretrained(model: nn.Module, path: str | os.PathLike, max_shard_size: str | int = "5GB",
                    dtype: torch.dtype | str | None = None) -> None:
    """Write config.json, sharded safetensors and (for more than one shard) the index.

    A tied lm_head is stored once, as embedding.weight. An earlier checkpoint in the directory is replaced
    whole (its stale shards or index would otherwise be loaded). Tensors are cast one at a time, so saving
    in another dtype never holds a second copy of the model.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    out_dtype = torch_dtype(dtype) if dtype is not None else None
    tensors = {spec.name: params[spec.name].detach() for spec in parameter_specs(model.config)}
    stored_dtype = out_dtype or next(iter(tensors.values())).dtype
    itemsize = stored_dtype.itemsize

    def stored_bytes(t: torch.Tensor) -> int:
        return t.numel() * (itemsize if out_dtype is not None else t.element_size())

    config_dict = model.config.to_dict() | {"torch_dtype": str(stored_dtype).replace("torch.", "")}
    groups = group_into_shards([(n, stored_bytes(t)) for n, t in tensors.items()], parse_size(max_shard_size))
    names = shard_names(len(groups))
    for stale in checkpoint_file_paths(directory):
        stale.unlink()
    weight_map = {}
    for file_name, group in zip(names, groups):
        metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config_dict, sort_keys=True)}
        write_safetensors(directory / file_name, {n: tensors[n] for n in group}, metadata, out_dtype)
        weight_map.update({n: file_name for n in group})
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if len(groups) > 1:
        write_index(directory, weight_map, sum(stored_bytes(t) for t in tensors.values()))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """One safetensors file holding `tensors` (cast to `dtype` one at a time when given), laid out by
    `layout_header`: the one writer of the runtime (checkpoints, distillation's per-layer files)."""
    code = {n: safetensors_code(dtype or t.dtype) for n, t in tensors.items()}
    header, offsets = layout_header([(n, code[n], tuple(t.shape)) for n, t in tensors.items()], metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name, _ in sorted(offsets.items(), key=lambda item: item[1][0]):
            data = tensors[name].to(dtype) if dtype is not None else tensors[name]
            data = data.cpu().contiguous().reshape(-1)
            if data.numel():  # numpy's buffer goes straight to the file: no bytes copy
                f.write(memoryview(data.view(torch.uint8).numpy()))


def checkpoint_files(path: Path) -> tuple[list[Path], MMRecConfig]:
    """The safetensors files of a checkpoint directory or single file, and its config."""
    if path.is_file():
        files = [path]
        config_path = path.parent / "config.json"
    elif path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid index ({exc})") from None
            files = []
            for name in dict.fromkeys(weight_map.values()):
                resolved = (path / name).resolve()
                if resolved.parent != path.resolve():
                    raise CheckpointError(f"{index}: names a file outside the checkpoint: {name!r}")
                files.append(path / name)
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        config_path = path / "config.json"
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    metadata = read_header(files[0]).metadata if path.is_file() else {}
    if CONFIG_METADATA_KEY in metadata:  # a single file carries its own config: it wins over neighbours
        return files, MMRecConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    if config_path.exists():
        return files, MMRecConfig.load(config_path)
    raise CheckpointError(f"{path}: no config.json beside it and none in its metadata")


def _map_tensor(mapped: mmap.mmap, span: TensorSpan) -> torch.Tensor:
    """A view of the memory map (no copy) when aligned; otherwise a copy of just this tensor."""
    dtype = torch_dtype(span.dtype)
    if span.numel == 0:
        return torch.empty(span.shape, dtype=dtype)
    if span.start % DTYPE_SIZES[span.dtype] == 0:
        return torch.frombuffer(mapped, dtype=dtype, count=span.numel, offset=span.start).view(span.shape)
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=span.nbytes, offset=span.start).clone()
    return raw.view(dtype).view(span.shape)


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of a copy-on-write memory map (no copy, no config)."""
    header = read_header(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return {name: _map_tensor(mapped, span) for name, span in header.tensors.items()}


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


class LazyStateDict(Mapping):
    """A read-only state dict over a checkpoint's files: each value is a view of a copy-on-write memory
    map, made when asked for, so `model.load_state_dict(LazyStateDict(path), strict=False)` copies
    tensor by tensor and never holds a second model in anonymous memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        files, self.config = checkpoint_files(self.path)
        self.headers = {file: read_header(file) for file in files}
        self._spans: dict[str, tuple[Path, TensorSpan]] = {}
        for file, header in self.headers.items():
            for name, span in header.tensors.items():
                self._spans[name] = (file, span)
        self._maps: dict[Path, mmap.mmap] = {}

    def locate(self, name: str) -> tuple[Path, TensorSpan]:
        """The file holding `name` and its byte range there."""
        return self._spans[name]

    def spans(self) -> dict[str, TensorSpan]:
        return {name: span for name, (_, span) in self._spans.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        file, span = self._spans[name]
        mapped = self._maps.get(file)
        if mapped is None:
            with open(file, "rb") as f:
                mapped = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return _map_tensor(mapped, span)

    def __iter__(self):
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


def load_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, strict: bool = True):
    """Build `cls(config)` on meta and fill it from the checkpoint, one tensor at a time.

    strict=False loads a partial checkpoint: parameters it lacks get the conversion-init values
    (zeros, ones or Xavier, seed 0), and tensors the model does not have are ignored.
    """
    path = Path(path)
    stored = LazyStateDict(path)
    config = stored.config
    device = torch.device(device) if device is not None else torch.device("cpu")
    want_dtype = torch_dtype(dtype) if dtype is not None else None
    model = cls.on_meta(config)
    expected = {spec.name: spec for spec in parameter_specs(config)}
    tied = config.tie_word_embeddings
    loaded, unexpected, mismatched = set(), [], []
    streamer = None
    if device.type == "cuda":  # read and copy overlapped through pinned buffers (device_load.py)
        from .device_load import PinnedStreamer

        streamer = PinnedStreamer(device)
        whole_files: dict[Path, dict[str, torch.Tensor]] = {}

        def streamer_tensor(name: str) -> torch.Tensor:
            """Files whose tensors keep their dtype arrive whole, in one pass; others tensor by tensor
            (a whole file in another dtype would briefly hold its tensors twice on the device)."""
            file, span = stored.locate(name)
            if want_dtype is not None and torch_dtype(span.dtype) != want_dtype:
                return streamer.load(file, span)
            if file not in whole_files:
                whole_files[file] = streamer.load_file(file, stored.headers[file])
            return whole_files[file][name]
    converted = []  # tensors to cast once their bytes have arrived
    for name, span in stored.spans().items():
        if tied and name == "lm_head.weight":
            continue  # a reference-style state dict stores the tied head too; it is the embedding
        spec = expected.get(name)
        if spec is None:
            unexpected.append(name)
            continue
        if span.shape != spec.shape:
            mismatched.append(f"{name}: checkpoint {list(span.shape)} vs model {list(spec.shape)}")
            continue
        if streamer is not None:
            tensor = streamer_tensor(name)
            if want_dtype is not None and tensor.is_floating_point() and tensor.dtype != want_dtype:
                converted.append(name)
        else:
            tensor = stored[name]
            if want_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(device=device, dtype=want_dtype)
            elif device.type != "cpu":
                tensor = tensor.to(device=device)
        _set_parameter(model, name, tensor)
        loaded.add(name)
    if streamer is not None:
        streamer.finish()
        for name in converted:
            _set_parameter(model, name, model.get_parameter(name).detach().to(want_dtype))
    missing = [name for name in expected if name not in loaded]
    problems = []
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if strict and missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the MM-Rec config: " + " | ".join(problems))
    fill_dtype = want_dtype or torch_dtype(config.torch_dtype or "float32")
    for name in missing:
        _set_parameter(model, name, conversion_init(name, expected[name].shape).to(device, fill_dtype))
    if tied:
        model.lm_head.weight = model.embedding.weight
    return model.eval()
