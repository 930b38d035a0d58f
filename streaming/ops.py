"""Transform ops: how one source tensor's rows become an output tensor's rows, one small class per op.

A plan stores each op as a plain dict (`{"op": "slice_rows", "start": 0, "stop": 100}`), which is what
the conversion report records and a mapping file may write. `parse_op` turns that dict into the op's
frozen dataclass, and the class answers everything the engine asks of an op:

* `out_shape(shape)` — the shape after the op (planning; ValueError when the op does not fit);
* `apply(src, context)` — a `Rows` giving the op's output rows from its input rows (execution);
* `held_bytes_per_element` / `gathers` — what producing a row holds besides it (the memory cost that
  sizes row blocks);
* `skipped_rows()` — for a pure row slice, how many leading rows it skips, so a plain slice of a stored
  tensor is copied as a byte range (None: the op's bytes must be computed);
* `keeps_meaning` — whether the op leaves what a value means unchanged (a cast), so scoring ignores it.

Adding an op is one class here, decorated with `@register`; nothing else dispatches on op names.
torch is imported only when rows are produced: planning never needs it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

from mmrec.messages import short
from mmrec.safetensors_format import CODE_TO_TORCH_NAME, torch_dtype

READ_BLOCK_BYTES = 32 << 20   # source bytes read at once inside a transpose
MEAN_BLOCK_BYTES = 16 << 20   # fixed (shape-derived) blocks for the padding mean: deterministic order
GATHER_SPAN_FACTOR = 4        # a gather reads its covering span when <= factor * rows + slack, else runs
GATHER_SPAN_SLACK = 64


class Rows:
    """A lazily computed tensor: its shape and a function giving rows [a, b) along dim 0."""

    def __init__(self, shape: tuple[int, ...], fn: Callable[[int, int], Any]):
        self.shape, self.fn = tuple(shape), fn

    def rows(self, a: int, b: int):
        return self.fn(a, b)

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


@dataclasses.dataclass
class OpContext:
    """What an op may keep between the row blocks of one task: computed-once values by key (the padding
    mean of a source tensor). Made by the caller and passed down, never stored on a shared object."""

    cached: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Op:
    """Base class of the transform ops. Subclasses are frozen dataclasses whose fields are the dict's keys."""

    name: ClassVar[str]
    keeps_meaning: ClassVar[bool] = False      # True: scoring treats the op as free (a cast)
    gathers: ClassVar[bool] = False            # reads scattered source rows (costed as a covering span)
    held_bytes_per_element: ClassVar[int] = 0  # intermediate bytes held per output element while producing

    def check(self) -> None:
        """Refuse field values that make no sense whatever the input shape (ValueError)."""

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def apply(self, src: Rows, context: OpContext, key: Any) -> Rows:
        raise NotImplementedError

    def skipped_rows(self) -> int | None:
        return None


OPS: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
    OPS[cls.name] = cls
    return cls


def parse_op(spec: dict) -> Op:
    """The typed op of a plan's dict; ValueError naming the op when it is unknown or lacks a field."""
    name = spec.get("op") if isinstance(spec, dict) else None
    cls = OPS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown transform op {name!r} (known: {', '.join(OPS)})")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in spec and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"transform {name!r} needs {', '.join(missing)}")
    for f in fields:
        if f.name in spec and not _FIELD_KINDS[f.type][0](spec[f.name]):
            raise ValueError(f"transform {name!r}: {f.name} must be {_FIELD_KINDS[f.type][1]}, got "
                             f"{short(spec[f.name])}")
    op = cls(**{f.name: spec[f.name] for f in fields if f.name in spec})
    op.check()
    return op


# What each field type of an op accepts (a mapping file or a report read back may hold anything).
_FIELD_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def _at_least(op: Op, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(op, name) < minimum:
            raise ValueError(f"transform {op.name!r}: {name} must be at least {minimum}, got {getattr(op, name)}")


def _heads(rows: int, heads: int, what: str) -> int:
    if heads <= 0 or rows % heads:
        raise ValueError(f"{what}: {rows} rows do not split into {heads} heads")
    return rows // heads


def _block_rows(row_bytes: int, budget: int) -> int:
    return max(1, budget // max(1, row_bytes))


def _gather(src: Rows, shape: tuple[int, ...], index: Callable[[int], int]) -> Rows:
    """Output row k is source row index(k). Reads the covering span when it is compact, else runs."""
    import torch

    def fn(a: int, b: int):
        idx = [index(k) for k in range(a, b)]
        if not idx:
            return src.rows(0, 0)
        lo, hi = min(idx), max(idx) + 1
        if hi - lo <= GATHER_SPAN_FACTOR * len(idx) + GATHER_SPAN_SLACK:
            span = src.rows(lo, hi)
            return span[torch.tensor([i - lo for i in idx], dtype=torch.long)]
        parts, run_start = [], 0
        for k in range(1, len(idx) + 1):  # contiguous runs of source rows
            if k == len(idx) or idx[k] != idx[k - 1] + 1:
                parts.append(src.rows(idx[run_start], idx[k - 1] + 1))
                run_start = k
        return torch.cat(parts)

    return Rows(shape, fn)


@register
@dataclasses.dataclass(frozen=True)
class Transpose(Op):
    """A GPT-2 Conv1D weight ([in, out]) to the Linear form ([out, in]). Reads the source in row blocks and
    keeps one column band, so memory is set by the block, not the tensor."""

    name: ClassVar[str] = "transpose"
    held_bytes_per_element: ClassVar[int] = 4

    def out_shape(self, shape):
        if len(shape) != 2:
            raise ValueError(f"transpose needs a 2-D tensor, got {list(shape)}")
        return (shape[1], shape[0])

    def apply(self, src, context, key):
        import torch

        r, c = src.shape

        def fn(a: int, b: int):
            probe = src.rows(0, 0)
            out = torch.empty((b - a, r), dtype=probe.dtype)
            step = _block_rows(c * probe.element_size(), READ_BLOCK_BYTES)
            for i in range(0, r, step):  # every source row holds one element of each output row
                j = min(r, i + step)
                out[:, i:j] = src.rows(i, j)[:, a:b].t()
            return out

        return Rows((c, r), fn)


@register
@dataclasses.dataclass(frozen=True)
class SliceRows(Op):
    """Rows [start, stop): one part of a fused tensor, or a smaller vocabulary."""

    name: ClassVar[str] = "slice_rows"
    start: int
    stop: int

    def check(self):
        _at_least(self, 0, "start", "stop")

    def out_shape(self, shape):
        if not 0 <= self.start <= self.stop <= shape[0]:
            raise ValueError(f"slice_rows [{self.start}, {self.stop}) is outside {shape[0]} rows")
        return (self.stop - self.start, *shape[1:])

    def apply(self, src, context, key):
        s = self.start
        return Rows(self.out_shape(src.shape), lambda a, b: src.rows(s + a, s + b))

    def skipped_rows(self):
        return self.start


@register
@dataclasses.dataclass(frozen=True)
class Add(Op):
    """Add a constant (Gemma stores its norm weights as w - 1)."""

    name: ClassVar[str] = "add"
    held_bytes_per_element: ClassVar[int] = 4
    value: float

    def apply(self, src, context, key):
        import torch

        value = float(self.value)

        def fn(a: int, b: int):
            x = src.rows(a, b)
            return x.to(torch.promote_types(x.dtype, torch.float32)) + value

        return Rows(src.shape, fn)


@register
@dataclasses.dataclass(frozen=True)
class Cast(Op):
    """Change the dtype (the output dtype's cast happens last in any case; this one is the plan's record)."""

    name: ClassVar[str] = "cast"
    keeps_meaning: ClassVar[bool] = True
    dtype: str

    def check(self):
        if self.dtype not in CODE_TO_TORCH_NAME:
            raise ValueError(f"transform 'cast': unknown dtype {short(self.dtype)}")

    def apply(self, src, context, key):
        dt = torch_dtype(self.dtype)
        return Rows(src.shape, lambda a, b: src.rows(a, b).to(dt))


@register
@dataclasses.dataclass(frozen=True)
class PadRows(Op):
    """Append `rows` rows (a larger vocabulary): the mean of the source rows, or zeros."""

    name: ClassVar[str] = "pad_rows"
    held_bytes_per_element: ClassVar[int] = 8
    rows: int
    fill: str = "mean"

    def check(self):
        _at_least(self, 0, "rows")
        if self.fill not in ("mean", "zeros"):
            raise ValueError("pad_rows fill must be 'mean' or 'zeros'")

    def out_shape(self, shape):
        return (shape[0] + int(self.rows), *shape[1:])

    def apply(self, src, context, key):
        import torch

        n = src.shape[0]

        def fn(a: int, b: int):
            head = src.rows(min(a, n), min(b, n))
            if b <= n:
                return head
            if self.fill == "mean":
                pad = _row_mean(src, context, key).expand(b - max(a, n), *src.shape[1:])
            else:
                pad = torch.zeros((b - max(a, n), *src.shape[1:]), dtype=torch.float64)
            return torch.cat([head.to(torch.float64), pad])  # widening is exact; cast happens last

        return Rows(self.out_shape(src.shape), fn)


def _row_mean(src: Rows, context: OpContext, key: Any):
    """Float64 mean of all source rows, summed in fixed shape-derived blocks (deterministic)."""
    import numpy as np
    import torch

    if key not in context.cached:
        # numpy adds the rows of a C-order block one after another (no thread-count dependent order)
        total = np.zeros(src.shape[1:], dtype=np.float64)
        step = _block_rows(src.row_elems * 8, MEAN_BLOCK_BYTES)
        for i in range(0, src.shape[0], step):
            total += src.rows(i, min(src.shape[0], i + step)).to(torch.float64).numpy().sum(axis=0)
        context.cached[key] = torch.from_numpy(total / max(1, src.shape[0]))
    return context.cached[key]


@register
@dataclasses.dataclass(frozen=True)
class RepeatKvHeads(Op):
    """Grouped-query k/v to one head per query head (transformers' repeat_kv: head h reads kv head h // n_rep)."""

    name: ClassVar[str] = "repeat_kv_heads"
    gathers: ClassVar[bool] = True
    num_kv_heads: int
    num_heads: int

    def check(self):
        _at_least(self, 1, "num_kv_heads", "num_heads")

    def out_shape(self, shape):
        hd = _heads(shape[0], self.num_kv_heads, self.name)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} heads are not a multiple of "
                             f"{self.num_kv_heads} kv heads")
        return (self.num_heads * hd, *shape[1:])

    def apply(self, src, context, key):
        hd, rep = src.shape[0] // self.num_kv_heads, self.num_heads // self.num_kv_heads
        return _gather(src, self.out_shape(src.shape), lambda k: (k // hd // rep) * hd + k % hd)


@register
@dataclasses.dataclass(frozen=True)
class RotaryMetaToHf(Op):
    """Meta's interleaved rotary pairs to the Hugging Face half-split order: w.view(h, hd/2, 2, D)
    .transpose(1, 2), i.e. output (h, j, i) <- input (h, i, j)."""

    name: ClassVar[str] = "rotary_meta_to_hf"
    gathers: ClassVar[bool] = True
    num_heads: int

    def check(self):
        _at_least(self, 1, "num_heads")

    def out_shape(self, shape):
        if _heads(shape[0], self.num_heads, self.name) % 2:
            raise ValueError(f"{self.name}: head size must be even")
        return shape

    def apply(self, src, context, key):
        hd = src.shape[0] // self.num_heads
        half = hd // 2
        return _gather(src, self.out_shape(src.shape),
                       lambda k: (k // hd) * hd + (k % hd % half) * 2 + (k % hd) // half)


@register
@dataclasses.dataclass(frozen=True)
class TakeHeads(Op):
    """One part of every head of a fused tensor whose rows are (head, part, head_dim) (GPT-NeoX's qkv)."""

    name: ClassVar[str] = "take_heads"
    gathers: ClassVar[bool] = True
    num_heads: int
    parts: int
    part: int

    def check(self):
        _at_least(self, 1, "num_heads", "parts")
        if not 0 <= self.part < self.parts:
            raise ValueError(f"transform 'take_heads': part {self.part} is not one of the {self.parts} parts")

    def out_shape(self, shape):
        per = _heads(shape[0], self.num_heads * self.parts, self.name)
        return (self.num_heads * per, *shape[1:])

    def apply(self, src, context, key):
        per = src.shape[0] // (self.num_heads * self.parts)
        parts, part = self.parts, self.part
        return _gather(src, self.out_shape(src.shape), lambda k: (k // per * parts + part) * per + k % per)
