"""Deterministic values for parameters a conversion cannot take from a source model.

MMREC_SPEC.md "Initialization": converter-made values are a pure function of (seed, tensor name, shape),
the same on every run, machine, scheduler, worker count and memory budget. We use a counter-based generator
(Philox) keyed by a hash of (seed, name, shape) with the counter derived from the row index, so any block of
rows can be generated on its own and comes out bit-identical to the same rows of the whole tensor.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from .schema import init_rule

_WORDS_PER_COUNTER = 8  # Philox4x64 yields four 64-bit words, i.e. eight 32-bit words, per counter


def _philox_key(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    digest = hashlib.sha256(f"mmrec-init\0{seed}\0{name}\0{list(shape)}".encode()).digest()
    return np.frombuffer(digest[:16], dtype=np.uint64).copy()


def uniform_rows(seed: int, name: str, shape: tuple[int, ...], start: int, stop: int,
                 low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """U[low, high) float32 values of rows [start, stop) of a tensor of `shape` (row = dim 0).

    Each value takes 23 random bits from one 32-bit word of the generator's output, placed as the mantissa
    of a float in [1, 2) — a few in-place integer ops instead of an int-to-float conversion and a scale.
    """
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    counters_per_row = -(-cols // _WORDS_PER_COUNTER)
    generator = np.random.Philox(key=_philox_key(seed, name, shape), counter=start * counters_per_row)
    raw = generator.random_raw((stop - start) * counters_per_row * _WORDS_PER_COUNTER // 2)
    words = torch.from_numpy(raw.view(np.int32)).view(stop - start, counters_per_row * _WORDS_PER_COUNTER)
    words.bitwise_and_(0x007FFFFF).bitwise_or_(0x3F800000)  # exponent of 1.0, random mantissa
    one_to_two = words.view(torch.float32)[:, :cols]
    return one_to_two.mul(high - low).add_(low - (high - low))  # [1, 2) -> [low, high)


def xavier_bound(shape: tuple[int, ...]) -> float:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_out, fan_in = shape[0] * receptive, shape[1] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


_PIECE_ELEMENTS = 1 << 17  # values generated per step: small enough that all the work stays in cache


def conversion_init(name: str, shape: tuple[int, ...], seed: int = 0, start: int = 0,
                    stop: int | None = None, rule: str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, stop) of the converter-made value of parameter `name`, as `dtype`.

    The value is defined in float32 (a `dtype` result is that value rounded), whatever rows are asked
    for. The rule (zeros, ones, xavier_uniform) defaults to mmrec.schema.init_rule for the name.
    For 1-D tensors "rows" are elements.
    """
    shape = tuple(int(s) for s in shape)
    stop = shape[0] if stop is None else stop
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"rows [{start}, {stop}) are outside '{name}' of shape {list(shape)}")
    rule = rule or init_rule(name, len(shape))
    block_shape = (stop - start, *shape[1:])
    if rule == "zeros":
        return torch.zeros(block_shape, dtype=dtype)
    if rule == "ones":
        return torch.ones(block_shape, dtype=dtype)
    if rule == "xavier_uniform":
        if len(shape) < 2:
            raise ValueError(f"xavier_uniform needs a tensor of 2 or more dims; '{name}' is {list(shape)}")
        bound = xavier_bound(shape)
        out = torch.empty(block_shape, dtype=dtype)
        rows = out.view(stop - start, -1)
        # A few rows at a time: the random words, the float32 values and the cast stay in the CPU's cache
        # instead of streaming a whole block through memory five times (which also lets threads scale).
        step = max(1, _PIECE_ELEMENTS // max(1, rows.shape[1]))
        for first in range(start, stop, step):
            last = min(stop, first + step)
            rows[first - start:last - start] = uniform_rows(seed, name, shape, first, last, -bound, bound)
        return out
    raise ValueError(f"unknown init rule {rule!r} for '{name}'")
