"""Meta's original LLaMA layout: consolidated.NN.pth tensor-parallel shards + params.json.

Each shard holds a slice of every matrix (column-parallel layers split their output rows, row-parallel
ones their input columns) and a full copy of every norm. A logical tensor is the list of its slices as
Pieces plus the dim they join on; nothing is concatenated until `read`. The names stay Meta's, and wq/wk
stay in Meta's rotary order (the plan brings them to the Hugging Face order).
"""

from __future__ import annotations

import re
from pathlib import Path

from .catalog import SourceError, SourceTensor
from .torch_zip import read_torch_zip

SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# Column-parallel (output rows split) and row-parallel (input columns split) weights.
JOIN_DIM = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w2.weight": 1,
}
# Copies of one tensor in every shard: taken once, from shard 0.
REPEATED = ("attention_norm.weight", "ffn_norm.weight", "norm.weight", "rope.freqs")


def meta_shards(root: Path) -> list[Path]:
    """consolidated.NN.pth files in shard order; their numbers must be 0..N-1."""
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := SHARD_RE.match(p.name))),
                   key=lambda x: x[0])
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        raise SourceError(f"{root}: Meta shards are numbered {numbers}, expected 0..{len(found) - 1}")
    return [p.absolute() for _, p in found]


def meta_entries(files: list[Path], params: dict) -> list[SourceTensor]:
    shards = [{name: (dtype, shape, piece) for name, dtype, shape, piece in read_torch_zip(f)} for f in files]
    names = list(shards[0])
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))[:3]
            raise SourceError(f"{f}: holds different tensors than {files[0].name} (e.g. {diff})")
    out = []
    for name in names:
        slices = [s[name] for s in shards]
        dtype = slices[0][0]
        for f, (dt, _, _) in zip(files, slices):
            if dt != dtype:
                raise SourceError(f"{f}: tensor '{name}' is {dt} but {dtype} in {files[0].name}")
        out.append(_join(name, dtype, slices, files, params))
    return out


def _join(name, dtype, slices, files, params) -> SourceTensor:
    shapes = [s[1] for s in slices]
    pieces = tuple(s[2] for s in slices)
    if len(slices) == 1:
        return SourceTensor(name, name, dtype, shapes[0], pieces, None)
    dim = _join_dim(name, shapes, params, files[0].parent)
    if dim is None:  # a repeated tensor
        if any(s != shapes[0] for s in shapes):
            raise SourceError(f"{files[0].parent}: tensor '{name}' should be repeated in every shard but its "
                              f"shapes differ: {shapes}")
        return SourceTensor(name, name, dtype, shapes[0], pieces[:1], None)
    for f, s in zip(files, shapes):
        if len(s) != len(shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != dim):
            raise SourceError(f"{f}: slice of '{name}' has shape {list(s)}, which cannot join "
                              f"{list(shapes[0])} along dim {dim}")
    shape = list(shapes[0])
    shape[dim] = sum(s[dim] for s in shapes)
    return SourceTensor(name, name, dtype, tuple(shape), pieces, dim)


def _join_dim(name: str, shapes, params, where) -> int | None:
    if name == "tok_embeddings.weight":
        if any(len(s) != 2 for s in shapes):
            raise SourceError(f"{where}: Meta tensor '{name}' should be 2-D in every shard, has shapes "
                              f"{[list(s) for s in shapes]}")
        # LLaMA 1/2 split the embedding's columns (ParallelEmbedding); LLaMA 3 splits the vocabulary
        # (VocabParallelEmbedding), leaving every slice full width.
        return 0 if shapes[0][1] == params.get("dim") else 1
    for suffix, dim in JOIN_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    if any(name == r or name.endswith("." + r) for r in REPEATED):
        return None
    if all(s == shapes[0] for s in shapes) and len(shapes[0]) <= 1:
        return None  # an unlisted vector that every shard holds whole: a copy
    raise SourceError(f"{where}: don't know how Meta tensor '{name}' is split across shards "
                      f"(shapes {[list(s) for s in shapes]})")
