"""Output layout: which shard holds each planned tensor, and every shard's header and byte offsets.

Everything is decided from the plan before any tensor byte is written, so writers can fill files at fixed
offsets in any order and the bytes come out the same whatever the scheduler.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mmrec.shards import CONFIG_METADATA_KEY, group_into_shards, shard_names
from mmrec.safetensors_format import DTYPE_SIZES, layout_header

from .plan.model import ConversionPlan, TensorPlan


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor lives: its shard and absolute byte range there."""

    name: str
    shard: str
    start: int
    end: int
    row_bytes: int  # bytes of one row along dim 0 (one element for 1-D tensors)
    rows: int


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    file_name: str
    header: bytes
    size: int  # total file size
    tensors: tuple[str, ...]  # in file order


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    shards: tuple[ShardLayout, ...]
    slots: dict[str, TensorSlot]
    single_file: bool

    @property
    def total_tensor_bytes(self) -> int:
        return sum(slot.end - slot.start for slot in self.slots.values())

    def weight_map(self) -> dict[str, str]:
        return {name: slot.shard for name, slot in self.slots.items()}


def tensor_bytes(tp: TensorPlan) -> int:
    return tp.numel * DTYPE_SIZES[tp.dtype]


def row_geometry(tp: TensorPlan) -> tuple[int, int]:
    """(rows, bytes per row) of an output tensor; 0-d tensors are one row."""
    return rows_of(tp.shape, tensor_bytes(tp))


def rows_of(shape, nbytes: int) -> tuple[int, int]:
    """(rows, bytes per row) of a tensor of `shape` stored in `nbytes`: rows along dim 0, 0-d is one row
    (what writers split tasks and checksum pieces by, and what `verify` recomputes from a header)."""
    rows = shape[0] if shape else 1
    return rows, (nbytes // rows if rows else 0)


def plan_layout(plan: ConversionPlan, max_shard_bytes: int, single_file_name: str | None = None) -> OutputLayout:
    """Group the plan's tensors into shards (greedy, in plan order) and lay out their headers.

    single_file_name: write everything to one file of that name, with config.json in its metadata.
    """
    sizes = [(tp.name, tensor_bytes(tp)) for tp in plan.tensors]
    groups = [[name for name, _ in sizes]] if single_file_name else group_into_shards(sizes, max_shard_bytes)
    names = [single_file_name] if single_file_name else shard_names(len(groups))
    by_name = {tp.name: tp for tp in plan.tensors}
    metadata = {"format": "pt"}
    if single_file_name:
        metadata[CONFIG_METADATA_KEY] = json.dumps(plan.target_config, sort_keys=True)
    shards, slots = [], {}
    for file_name, group in zip(names, groups):
        entries = [(n, by_name[n].dtype, tuple(by_name[n].shape)) for n in group]
        header, offsets = layout_header(entries, metadata)
        ordered = tuple(sorted(offsets, key=lambda n: offsets[n][0]))
        size = max([end for _, end in offsets.values()], default=len(header))
        shards.append(ShardLayout(file_name, header, size, ordered))
        for name in ordered:
            rows, row_bytes = row_geometry(by_name[name])
            slots[name] = TensorSlot(name, file_name, *offsets[name], row_bytes, rows)
    return OutputLayout(tuple(shards), slots, single_file_name is not None)


def output_paths(output: Path) -> tuple[Path, str | None]:
    """(directory the shards go to, single file name or None) for an --output path."""
    if output.suffix == ".safetensors":
        return output.parent, output.name
    return output, None
