"""Deterministic values for parameters a conversion cannot take from a source model.

docs/mmrec-v1.md "Initialization": converter-made values are a pure function of (seed, tensor name, shape),
the same on every run, machine, scheduler, worker count and memory budget.

How (init format 2): one PCG64-DXSM stream per tensor, seeded from a hash of (seed, name, shape). Each
64-bit output word holds four 16-bit signed lanes (little-endian); lane k belongs to element k of the
flattened tensor. Element k's xavier-uniform value is the float32 (i_k + 0.5) * (bound / 32768): a uniform
grid of 65,536 levels, symmetric about 0, strictly inside (-bound, bound); other dtypes get that float32
value rounded to nearest-even. The generator can jump to any word (`advance`), so any block of rows is
generated on its own, bit-identical to the same rows of the whole tensor.

Why this and not Philox with a mantissa trick (format 1): 16 random bits per value instead of 32, and
numpy's fastest counter-jumpable generator; about 4x faster end to end (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from .schema import INIT_FORMAT, init_rule  # noqa: F401 (INIT_FORMAT: this module's definition's number)
_LANES_PER_WORD = 4  # 16-bit lanes per 64-bit generator word
_LANE_SCALE = 32768.0  # int16 lanes cover [-32768, 32767]
_PIECE_ELEMENTS = 1 << 17  # values converted per step: the lanes and their float32 stay in the CPU's cache


def _stream(seed: int, name: str, shape: tuple[int, ...], first_element: int) -> tuple[np.random.PCG64DXSM, int]:
    """The tensor's generator positioned at the word holding `first_element`, and the lanes to skip."""
    digest = hashlib.sha256(f"mmrec-init-2\0{seed}\0{name}\0{list(shape)}".encode()).digest()
    generator = np.random.PCG64DXSM(int.from_bytes(digest[:16], "little"))
    word, skip = divmod(first_element, _LANES_PER_WORD)
    generator.advance(word)
    return generator, skip


def uniform_lanes(seed: int, name: str, shape: tuple[int, ...], first: int, count: int) -> np.ndarray:
    """The int16 lanes of elements [first, first + count) of the flattened tensor (the random source of
    every converter-made uniform value; exposed so tests can check the definition independently)."""
    generator, skip = _stream(seed, name, shape, first)
    words = -(-(skip + count) // _LANES_PER_WORD)
    lanes = generator.random_raw(words).astype("<u8", copy=False).view("<i2")
    return lanes[skip:skip + count]


def xavier_bound(shape: tuple[int, ...]) -> float:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_out, fan_in = shape[0] * receptive, shape[1] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


def _fill_uniform(flat_out, seed: int, name: str, shape: tuple[int, ...], first: int, bound: float) -> None:
    """flat_out[:] = the xavier values of elements [first, first + len(flat_out)), piece by piece."""
    import torch

    end = first + flat_out.numel()
    generator, skip = _stream(seed, name, shape, first)
    lane = first - skip  # element index of the next lane the generator gives
    step = np.float32(bound / _LANE_SCALE)
    scratch = np.empty(min(end - lane, _PIECE_ELEMENTS), dtype=np.float32)
    scratch_t = torch.from_numpy(scratch)
    while lane < end:
        words = min(_PIECE_ELEMENTS, end - lane + _LANES_PER_WORD - 1) // _LANES_PER_WORD
        lanes = generator.random_raw(words).astype("<u8", copy=False).view("<i2")
        lo, hi = max(first, lane), min(end, lane + len(lanes))
        values = scratch[:hi - lo]
        np.add(lanes[lo - lane:hi - lane], np.float32(0.5), out=values, dtype=np.float32)  # exact
        np.multiply(values, step, out=values)  # the one rounding of the float32 value
        flat_out[lo - first:hi - first].copy_(scratch_t[:hi - lo])  # round-to-nearest-even into the dtype
        lane += len(lanes)


def conversion_init(name: str, shape: tuple[int, ...], seed: int = 0, start: int = 0,
                    stop: int | None = None, rule: str | None = None, dtype=None, out=None):
    """Rows [start, stop) of the converter-made value of parameter `name`, as `dtype` (float32 default).

    The value is defined in float32 (a `dtype` result is that value rounded), whatever rows are asked
    for. The rule (zeros, ones, xavier_uniform) defaults to mmrec.schema.init_rule for the name.
    For 1-D tensors "rows" are elements. `out`: a contiguous tensor of the block's size to fill instead
    of allocating one (the streaming writer reuses one buffer for every block of a task).
    """
    import torch

    shape = tuple(int(s) for s in shape)
    stop = shape[0] if stop is None else stop
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"rows [{start}, {stop}) are outside '{name}' of shape {list(shape)}")
    rule = rule or init_rule(name, len(shape))
    block_shape = (stop - start, *shape[1:])
    if out is None:
        out = torch.empty(block_shape, dtype=dtype or torch.float32)
    else:
        out = out.view(block_shape)
    if rule == "zeros":
        return out.zero_()
    if rule == "ones":
        return out.fill_(1)
    if rule == "xavier_uniform":
        if len(shape) < 2:
            raise ValueError(f"xavier_uniform needs a tensor of 2 or more dims; '{name}' is {list(shape)}")
        row_elements = math.prod(shape[1:])
        _fill_uniform(out.view(-1), seed, name, shape, start * row_elements, xavier_bound(shape))
        return out
    raise ValueError(f"unknown init rule {rule!r} for '{name}'")
