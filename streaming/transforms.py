"""Row-block transforms: compute rows [start, stop) of an output tensor from bounded reads of its source.

Each op of a TensorPlan wraps a "row source" (shape + rows(a, b)) into another one. Memory is set by the
block, not by the tensor: a transpose reads its source in row blocks and keeps only the needed column
band; row gathers (head permutes, head repeats) read only the source rows they need. The same rows come
out bit-identical whatever the block boundaries are. torch is imported lazily: planning needs only
`infer_shape` / `check_ops`.
"""

from __future__ import annotations

import math
from typing import Callable

from mmrec.safetensors_format import CODE_TO_TORCH_NAME, DTYPE_SIZES

READ_BLOCK_BYTES = 32 << 20   # source bytes read at once inside a transpose / mean
MEAN_BLOCK_BYTES = 16 << 20   # fixed (shape-derived) blocks for the padding mean: deterministic order
GATHER_SPAN_FACTOR = 4        # a gather reads its covering span when <= factor * rows + slack, else runs
GATHER_SPAN_SLACK = 64
PRODUCT_OP = "matmul"         # two sources: scale · left · right, each operand with its own op chain
PRODUCT_BLOCK_ROWS = 64       # a product is computed in these fixed row blocks (bytes independent of splits)
PRODUCT_BAND_COLUMNS = 1024   # ... and fixed column bands, so only one float64 band of the right operand is held

OPS = {  # op -> required fields
    "transpose": (), "slice_rows": ("start", "stop"), "add": ("value",), "cast": ("dtype",),
    "pad_rows": ("rows",), "repeat_kv_heads": ("num_kv_heads", "num_heads"),
    "rotary_meta_to_hf": ("num_heads",), "take_heads": ("num_heads", "parts", "part"),
}
STRUCTURAL_FREE = {"cast"}  # ops that do not change what a value means (they don't lower the score)


def check_ops(ops: list[dict]) -> None:
    for op in ops:
        name = op.get("op")
        if name not in OPS:
            raise ValueError(f"unknown transform op {name!r} (known: {', '.join(OPS)})")
        missing = [f for f in OPS[name] if f not in op]
        if missing:
            raise ValueError(f"transform {name!r} needs {', '.join(missing)}")
        if name == "pad_rows" and op.get("fill", "mean") not in ("mean", "zeros"):
            raise ValueError("pad_rows fill must be 'mean' or 'zeros'")


def _heads(rows: int, heads: int, what: str) -> int:
    if heads <= 0 or rows % heads:
        raise ValueError(f"{what}: {rows} rows do not split into {heads} heads")
    return rows // heads


def infer_shape(ops: list[dict], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape after applying ops to a tensor of `shape`; ValueError when an op does not fit."""
    shape = tuple(shape)
    for op in ops:
        name = op["op"]
        if name == "transpose":
            if len(shape) != 2:
                raise ValueError(f"transpose needs a 2-D tensor, got {list(shape)}")
            shape = (shape[1], shape[0])
        elif name == "slice_rows":
            if not 0 <= op["start"] <= op["stop"] <= shape[0]:
                raise ValueError(f"slice_rows [{op['start']}, {op['stop']}) is outside {shape[0]} rows")
            shape = (op["stop"] - op["start"], *shape[1:])
        elif name == "pad_rows":
            shape = (shape[0] + int(op["rows"]), *shape[1:])
        elif name == "repeat_kv_heads":
            hd = _heads(shape[0], op["num_kv_heads"], name)
            if op["num_heads"] % op["num_kv_heads"]:
                raise ValueError(f"{name}: {op['num_heads']} heads are not a multiple of "
                                 f"{op['num_kv_heads']} kv heads")
            shape = (op["num_heads"] * hd, *shape[1:])
        elif name == "rotary_meta_to_hf":
            if _heads(shape[0], op["num_heads"], name) % 2:
                raise ValueError(f"{name}: head size must be even")
        elif name == "take_heads":
            per = _heads(shape[0], op["num_heads"] * op["parts"], name)
            shape = (op["num_heads"] * per, *shape[1:])
        elif name not in OPS:
            raise ValueError(f"unknown transform op {name!r}")
    return shape


# -- row sources --------------------------------------------------------------------------------------
class _Rows:
    """A lazily computed tensor: its shape and a function giving rows [a, b) along dim 0."""

    def __init__(self, shape: tuple[int, ...], fn: Callable[[int, int], "object"]):
        self.shape, self.fn = tuple(shape), fn

    def rows(self, a: int, b: int):
        return self.fn(a, b)

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


def _source_rows(catalog, name: str) -> _Rows:
    t = catalog.tensors[name]
    return _Rows(tuple(t.shape), lambda a, b: catalog.read(name, a, b))


def _block_rows(row_bytes: int, budget: int) -> int:
    return max(1, budget // max(1, row_bytes))


def _transpose(src: _Rows) -> _Rows:
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

    return _Rows((c, r), fn)


def _gather(src: _Rows, shape: tuple[int, ...], index: Callable[[int], int]) -> _Rows:
    """Output row k is source row index(k). Reads the covering span when it is compact, else runs."""
    import torch

    def fn(a: int, b: int):
        idx = [index(k) for k in range(a, b)]
        if not idx:
            return src.rows(0, 0)
        lo, hi = min(idx), max(idx) + 1
        slack = GATHER_SPAN_SLACK if GATHER_SPAN_FACTOR else 0  # factor 0: never read a span
        if hi - lo <= GATHER_SPAN_FACTOR * len(idx) + slack:
            span = src.rows(lo, hi)
            return span[torch.tensor([i - lo for i in idx], dtype=torch.long)]
        parts, run_start = [], 0
        for k in range(1, len(idx) + 1):  # contiguous runs of source rows
            if k == len(idx) or idx[k] != idx[k - 1] + 1:
                parts.append(src.rows(idx[run_start], idx[k - 1] + 1))
                run_start = k
        return torch.cat(parts)

    return _Rows(shape, fn)


def _pad_mean(catalog, src: _Rows, cache_key) -> "object":
    """Float64 mean of all source rows, summed in fixed shape-derived blocks (deterministic)."""
    import torch

    cache = catalog.__dict__.setdefault("_mmrec_pad_means", {}) if hasattr(catalog, "__dict__") else {}
    if cache_key in cache:
        return cache[cache_key]
    import numpy as np

    # numpy adds the rows of a C-order block one after another (no thread-count dependent order)
    total = np.zeros(src.shape[1:], dtype=np.float64)
    step = _block_rows(src.row_elems * 8, MEAN_BLOCK_BYTES)
    for i in range(0, src.shape[0], step):
        total += src.rows(i, min(src.shape[0], i + step)).to(torch.float64).numpy().sum(axis=0)
    mean = torch.from_numpy(total / max(1, src.shape[0]))
    cache[cache_key] = mean
    return mean


def _apply(op: dict, src: _Rows, catalog, key) -> _Rows:
    import torch

    name = op["op"]
    if name == "transpose":
        return _transpose(src)
    if name == "slice_rows":
        s = op["start"]
        return _Rows(infer_shape([op], src.shape), lambda a, b: src.rows(s + a, s + b))
    if name == "add":
        value = float(op["value"])

        def fn(a: int, b: int):
            x = src.rows(a, b)
            return x.to(torch.promote_types(x.dtype, torch.float32)) + value  # e.g. Gemma's w + 1

        return _Rows(src.shape, fn)
    if name == "cast":
        dt = getattr(torch, CODE_TO_TORCH_NAME[op["dtype"]])
        return _Rows(src.shape, lambda a, b: src.rows(a, b).to(dt))
    if name == "pad_rows":
        n, fill = src.shape[0], op.get("fill", "mean")

        def fn(a: int, b: int):
            head = src.rows(min(a, n), min(b, n))
            if b <= n:
                return head
            if fill == "mean":
                pad = _pad_mean(catalog, src, key).expand(b - max(a, n), *src.shape[1:])
            else:
                pad = torch.zeros((b - max(a, n), *src.shape[1:]), dtype=torch.float64)
            return torch.cat([head.to(torch.float64), pad])  # widening is exact; cast happens last

        return _Rows(infer_shape([op], src.shape), fn)
    shape = infer_shape([op], src.shape)
    if name == "repeat_kv_heads":  # HF repeat_kv: output head h reads kv head h // n_rep
        hd, rep = src.shape[0] // op["num_kv_heads"], op["num_heads"] // op["num_kv_heads"]
        return _gather(src, shape, lambda k: (k // hd // rep) * hd + k % hd)
    if name == "rotary_meta_to_hf":  # w.view(h, hd/2, 2, D).transpose(1, 2): out (h, j, i) <- in (h, i, j)
        hd = src.shape[0] // op["num_heads"]
        half = hd // 2
        return _gather(src, shape, lambda k: (k // hd) * hd + (k % hd % half) * 2 + (k % hd) // half)
    if name == "take_heads":  # rows are (head, part, head_dim): keep one part of every head
        per = src.shape[0] // (op["num_heads"] * op["parts"])
        return _gather(src, shape, lambda k: (k // per * op["parts"] + op["part"]) * per + k % per)
    raise ValueError(f"unknown transform op {name!r}")


def _chain(catalog, name: str, ops: list[dict]) -> _Rows:
    src = _source_rows(catalog, name)
    for i, op in enumerate(ops):
        src = _apply(op, src, catalog, (name, tuple(map(repr, ops[:i]))))
    return src


def _product(catalog, tp) -> _Rows:
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
    left, right = _chain(catalog, tp.sources[0], op["left"]), _chain(catalog, tp.sources[1], right_ops)
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

    return _Rows((left.shape[0], right.shape[1]), fn)


def _pipeline(tp, catalog) -> _Rows:
    if tp.transforms and tp.transforms[0]["op"] == PRODUCT_OP:
        if len(tp.sources) != 2 or len(tp.transforms) != 1:
            raise ValueError(f"{tp.name}: a matmul reads two source tensors and is the only op")
        src = _product(catalog, tp)
    elif len(tp.sources) != 1:
        raise ValueError(f"{tp.name}: a transform reads exactly one source tensor, got {tp.sources}")
    else:
        src = _chain(catalog, tp.sources[0], tp.transforms)
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
    out_dtype = getattr(torch, CODE_TO_TORCH_NAME[tp.dtype])
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
    pipeline = _pipeline(tp, catalog)

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
        ops = {op["op"] for op in tp.transforms}
        gathers = ops & {"repeat_kv_heads", "rotary_meta_to_hf", "take_heads"}
        per_row += elems * 4 * (1 + GATHER_SPAN_FACTOR * bool(gathers))  # source rows (a gather's span)
        per_row += elems * (4 * ("add" in ops) + 8 * ("pad_rows" in ops) + 4 * ("transpose" in ops))
    return max(1, min(tp.shape[0] if tp.shape else 1, budget_bytes // max(1, per_row)))


def copy_range(tp, catalog) -> tuple[str, int, int] | None:
    """(file, start, end) when tp's output bytes are one contiguous byte range of a source file:
    a plain copy, or contiguous row slices of one (Phi-3's fused splits, vocabulary truncation)."""
    if tp.kind == "init" or len(tp.sources) != 1:
        return None
    if any(op["op"] != "slice_rows" for op in tp.transforms):
        return None
    st = catalog.tensors.get(tp.sources[0])
    if st is None or st.dtype != tp.dtype:
        return None
    rng = st.byte_range()
    if rng is None:
        return None
    file, begin, _ = rng
    row = (math.prod(st.shape[1:]) if len(st.shape) > 1 else 1) * DTYPE_SIZES[st.dtype]
    first = 0
    for op in tp.transforms:
        first += op["start"]
    return (file, begin + first * row, begin + first * row + math.prod(tp.shape) * DTYPE_SIZES[tp.dtype])
