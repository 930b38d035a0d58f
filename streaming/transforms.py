"""Row-block recipes: compute rows [start, stop) of an output tensor from bounded reads of its source.

A TensorPlan's recipe is a chain of ops (`streaming/ops.py`, one class per op) over one source tensor, or
a product of two such chains (an init mode's `matmul`). Memory is set by the block, not by the tensor, and
the same rows come out bit-identical whatever the block boundaries are. torch is imported lazily:
planning needs only `infer_shape` / `check_ops`.
"""

from __future__ import annotations

import math
from typing import Callable

from mmrec.safetensors_format import DTYPE_SIZES, torch_dtype

from .ops import GATHER_SPAN_FACTOR, Op, OpContext, Rows, parse_op

PRODUCT_OP = "matmul"         # two sources: scale · left · right, each operand with its own op chain
PRODUCT_BLOCK_ROWS = 64       # a product is computed in these fixed row blocks (bytes independent of splits)
PRODUCT_BAND_COLUMNS = 1024   # ... and fixed column bands, so only one float64 band of the right operand is held


def check_ops(ops: list[dict]) -> None:
    """ValueError naming the first op that is unknown, lacks a field or has an impossible one."""
    for op in ops:
        parse_op(op)


def check_recipe(tp) -> None:
    """ValueError when a plan's recipe (e.g. one read back from a report) names an unknown op or gives an op
    a field of the wrong kind; a product checks both of its operand chains."""
    ops = tp.transforms if isinstance(tp.transforms, list) else [tp.transforms]
    first = ops[0] if ops else None
    if isinstance(first, dict) and first.get("op") == PRODUCT_OP:
        for side in ("left", "right"):
            chain = first.get(side)
            check_ops(chain if isinstance(chain, list) else [chain])
    else:
        check_ops(ops)


def infer_shape(ops: list[dict], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape after applying ops to a tensor of `shape`; ValueError when an op does not fit."""
    shape = tuple(shape)
    for op in ops:
        shape = parse_op(op).out_shape(shape)
    return shape


def keeps_meaning(op: dict) -> bool:
    """Whether the op leaves what a value means unchanged (a cast): it does not lower a tensor's score."""
    return parse_op(op).keeps_meaning


def _source_rows(catalog, name: str) -> Rows:
    t = catalog.tensors[name]
    return Rows(tuple(t.shape), lambda a, b: catalog.read(name, a, b))


def _chain(catalog, name: str, ops: list[dict], context: OpContext) -> Rows:
    src = _source_rows(catalog, name)
    for i, op in enumerate(ops):
        src = parse_op(op).apply(src, context, (name, tuple(map(repr, ops[:i]))))
    return src


def _product(catalog, tp, context: OpContext) -> Rows:
    """scale · left · right (an init mode's recipe, e.g. W_v = 10 · o_proj · v_proj), computed in float64
    over fixed PRODUCT_BLOCK_ROWS-row blocks, so the bytes do not depend on how the caller splits the rows.
    Holds the right operand as its op chain gives it ([K, N], built on first use and reused by every later
    call), one float64 band of PRODUCT_BAND_COLUMNS of its columns, and the float64 left rows of one call.

    When the right operand is a grouped-query v_proj repeated to every head, left · repeat(v) is computed
    as (left with each kv group's columns summed) · v: the same product with `heads / kv_heads` times
    fewer multiplications and a smaller operand held.
    """
    import torch

    (op,) = tp.transforms
    right_ops, fold = op["right"], None
    if right_ops and right_ops[-1]["op"] == "repeat_kv_heads":
        right_ops, fold = right_ops[:-1], right_ops[-1]
    left = _chain(catalog, tp.sources[0], op["left"], context)
    right = _chain(catalog, tp.sources[1], right_ops, context)
    inner = right.shape[0] if fold is None else infer_shape([fold], right.shape)[0]
    if len(left.shape) != 2 or len(right.shape) != 2 or left.shape[1] != inner:
        raise ValueError(f"{tp.name}: cannot multiply {list(left.shape)} by {list(right.shape)}")
    scale = float(op["scale"])
    held = []  # the right operand as its chain gives it (a memory-map view for a plain v_proj), once

    def left_rows(i: int, j: int):
        rows = left.rows(i, j).to(torch.float64)
        if fold is None:
            return rows
        kv, rep = fold["num_kv_heads"], fold["num_heads"] // fold["num_kv_heads"]
        groups = rows.view(j - i, kv, rep, -1)  # columns are (kv head, repeat, head dim)
        summed = groups[:, :, 0].clone()
        for r in range(1, rep):  # one fixed order: the bytes never depend on threads
            summed += groups[:, :, r]
        return summed.reshape(j - i, -1)

    def fn(a: int, b: int):
        if not held:
            held.append(right.rows(0, right.shape[0]))
        lo = a - a % PRODUCT_BLOCK_ROWS
        lefts = [left_rows(i, min(left.shape[0], i + PRODUCT_BLOCK_ROWS)) for i in range(lo, b, PRODUCT_BLOCK_ROWS)]
        out = torch.empty((sum(len(x) for x in lefts), right.shape[1]), dtype=torch.float64)
        for c in range(0, right.shape[1], PRODUCT_BAND_COLUMNS):  # one float64 band of the right operand at a time
            band = held[0][:, c:c + PRODUCT_BAND_COLUMNS].to(torch.float64)
            row = 0
            for block in lefts:
                out[row:row + len(block), c:c + band.shape[1]] = block @ band
                row += len(block)
        return out[a - lo:b - lo].mul_(scale)

    return Rows((left.shape[0], right.shape[1]), fn)


def _pipeline(tp, catalog, context: OpContext) -> Rows:
    if tp.transforms and tp.transforms[0]["op"] == PRODUCT_OP:
        if len(tp.sources) != 2 or len(tp.transforms) != 1:
            raise ValueError(f"{tp.name}: a matmul reads two source tensors and is the only op")
        src = _product(catalog, tp, context)
    elif len(tp.sources) != 1:
        raise ValueError(f"{tp.name}: a transform reads exactly one source tensor, got {tp.sources}")
    else:
        src = _chain(catalog, tp.sources[0], tp.transforms, context)
    if tuple(src.shape) != tuple(tp.shape):
        raise ValueError(f"{tp.name}: transforms give {list(src.shape)}, plan says {list(tp.shape)}")
    return src


# -- public API -----------------------------------------------------------------------------------------
def row_producer(tp, catalog, seed: int) -> Callable[[int, int], "object"]:
    """A function giving rows [start, stop) of tp's output (elements for 1-D) in tp.dtype, C-contiguous.

    Build one per task and call it per block: what a recipe holds across blocks (a product's right
    operand, an init block's buffer) is made once.
    """
    import torch

    rows = tp.shape[0] if tp.shape else 1
    out_dtype = torch_dtype(tp.dtype)
    if tp.kind == "init":
        from mmrec.init import conversion_init

        buffer = []  # one output block, refilled in place (no fresh pages to fault in per block)

        def produce(start: int, stop: int):
            _check_rows(tp, rows, start, stop)
            numel = (stop - start) * math.prod(tp.shape[1:])
            if not buffer or buffer[0].numel() < numel:
                buffer[:] = [torch.empty(numel, dtype=out_dtype)]
            out = buffer[0][:numel]
            return conversion_init(tp.name, tuple(tp.shape), seed, start, stop, rule=tp.init, out=out)

        return produce
    pipeline = _pipeline(tp, catalog, OpContext())

    def produce(start: int, stop: int):
        _check_rows(tp, rows, start, stop)
        return pipeline.rows(start, stop).to(out_dtype).contiguous()

    return produce


def _check_rows(tp, rows: int, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"{tp.name}: rows [{start}, {stop}) are outside its {rows} rows")


def materialize_rows(tp, catalog, start: int, stop: int, seed: int):
    """Rows [start, stop) along dim 0 of tp's output (elements for 1-D), in tp.dtype, C-contiguous."""
    return row_producer(tp, catalog, seed)(start, stop)


def rows_per_block(tp, budget_bytes: int) -> int:
    """Output rows that fit a chunk budget (>= 1): the output row plus what producing it holds at once
    (source rows read, float32/float64 intermediates), assuming sources of at most 4 bytes an element."""
    elems = math.prod(tp.shape[1:]) if len(tp.shape) > 1 else 1
    per_row = elems * DTYPE_SIZES[tp.dtype]
    if tp.kind == "init":
        pass  # generated in cache-sized pieces straight into the output block
    elif tp.kind == "transform" and tp.transforms[0]["op"] == PRODUCT_OP:
        # float64 left rows and product rows per output row; the right operand and one float64 band of it
        # are held besides (the inner dimension is taken to be about the output's width)
        per_row += 8 * (elems + elems)
        blocks = max(1, budget_bytes // max(1, per_row * PRODUCT_BLOCK_ROWS))
        return min(tp.shape[0], blocks * PRODUCT_BLOCK_ROWS)
    elif tp.kind == "transform":
        ops: set[type[Op]] = {type(parse_op(op)) for op in tp.transforms}
        gathers = any(op.gathers for op in ops)
        per_row += elems * 4 * (1 + GATHER_SPAN_FACTOR * gathers)  # source rows (a gather's span)
        per_row += elems * sum(op.held_bytes_per_element for op in ops)
    return max(1, min(tp.shape[0] if tp.shape else 1, budget_bytes // max(1, per_row)))


def copy_range(tp, catalog) -> tuple[str, int, int] | None:
    """(file, start, end) when tp's output bytes are one contiguous byte range of a source file:
    a plain copy, or contiguous row slices of one (Phi-3's fused splits, vocabulary truncation)."""
    if tp.kind == "init" or len(tp.sources) != 1:
        return None
    skipped = [parse_op(op).skipped_rows() for op in tp.transforms]
    if None in skipped:
        return None
    st = catalog.tensors.get(tp.sources[0])
    if st is None or st.dtype != tp.dtype:
        return None
    rng = st.byte_range()
    if rng is None:
        return None
    file, begin, _ = rng
    row = (math.prod(st.shape[1:]) if len(st.shape) > 1 else 1) * DTYPE_SIZES[st.dtype]
    first = begin + sum(skipped) * row
    return (file, first, first + math.prod(tp.shape) * DTYPE_SIZES[tp.dtype])
