import math

import pytest
import torch

from mmrec import conversion_init


def test_same_bytes_every_call_and_chunk_independent():
    shape = (37, 23)  # awkward sizes: not multiples of the generator's block
    whole = conversion_init("blocks.0.mdi.W_g.weight", shape, seed=7)
    again = conversion_init("blocks.0.mdi.W_g.weight", shape, seed=7)
    assert torch.equal(whole, again)
    pieces = [conversion_init("blocks.0.mdi.W_g.weight", shape, seed=7, start=a, stop=b)
              for a, b in [(0, 1), (1, 10), (10, 11), (11, 37)]]
    assert torch.equal(torch.cat(pieces), whole)


def test_depends_on_seed_name_and_shape():
    base = conversion_init("blocks.0.W_z.weight", (16, 16), seed=0)
    assert not torch.equal(base, conversion_init("blocks.0.W_z.weight", (16, 16), seed=1))
    assert not torch.equal(base, conversion_init("blocks.1.W_z.weight", (16, 16), seed=0))
    assert not torch.equal(base[:8], conversion_init("blocks.0.W_z.weight", (8, 16), seed=0))


def test_xavier_uniform_bounds_and_spread():
    shape = (256, 512)
    values = conversion_init("blocks.0.mdi.W_gamma.0.weight", shape)
    bound = math.sqrt(6 / (256 + 512))
    assert values.dtype == torch.float32 and values.shape == shape
    assert values.abs().max() <= bound
    # uniform on [-b, b] has standard deviation b / sqrt(3)
    assert abs(values.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    assert abs(values.mean().item()) < 0.01 * bound


@pytest.mark.parametrize("name, expected", [
    ("blocks.3.mdi.W_g.bias", 0.0), ("blocks.0.norm1.weight", 1.0), ("blocks.0.norm2.weight", 1.0),
    ("norm.weight", 1.0), ("blocks.0.ffn.0.bias", 0.0),
])
def test_vector_rules(name, expected):
    assert torch.equal(conversion_init(name, (9,)), torch.full((9,), expected))


def test_rows_outside_the_tensor_are_refused():
    with pytest.raises(ValueError, match="outside"):
        conversion_init("blocks.0.W_z.weight", (4, 4), start=2, stop=5)


# -- init format 2: PCG64-DXSM 16-bit lanes (mmrec/init.py) ----------------------------------------------------
import hashlib  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402

from mmrec.init import INIT_FORMAT, uniform_lanes, xavier_bound  # noqa: E402

# odd shapes: rows that end mid-word (cols not a multiple of 4), a 3-D tensor, and one spanning several of
# the generator's 2**17-element pieces
ODD_SHAPES = [(37, 23), (5, 3), (13, 1), (7, 5, 3), (300, 1001)]


def _reference_lanes(seed: int, name: str, shape: tuple, count: int) -> np.ndarray:
    """The documented definition, written out independently: PCG64-DXSM seeded from sha256 of (seed, name,
    shape); each 64-bit word holds four 16-bit signed lanes, lane k (low bits first) = element k."""
    digest = hashlib.sha256(f"mmrec-init-2\0{seed}\0{name}\0{list(shape)}".encode()).digest()
    words = np.random.PCG64DXSM(int.from_bytes(digest[:16], "little")).random_raw(-(-count // 4))
    words = np.asarray(words, dtype=np.uint64)
    lanes = np.stack([(words >> np.uint64(16 * j)) & np.uint64(0xFFFF) for j in range(4)], axis=1).reshape(-1)
    return lanes[:count].astype(np.uint16).view(np.int16)


def _reference_values(seed: int, name: str, shape: tuple) -> np.ndarray:
    """float32 (i_k + 0.5) * float32(bound / 32768), computed with numpy from the exposed lanes."""
    count = math.prod(shape)
    lanes = uniform_lanes(seed, name, shape, 0, count)
    bound = math.sqrt(6.0 / (shape[0] * math.prod(shape[2:]) + shape[1] * math.prod(shape[2:])))
    step = np.float32(bound / 32768.0)
    return ((lanes.astype(np.float32) + np.float32(0.5)) * step).astype(np.float32).reshape(shape)


def test_init_format_is_2():
    assert INIT_FORMAT == 2


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("seed", [0, 12345])
def test_uniform_lanes_are_the_documented_stream(shape, seed):
    name = "blocks.2.mdi.W_g.weight"
    count = math.prod(shape)
    whole = uniform_lanes(seed, name, shape, 0, count)
    assert whole.dtype == np.int16 and whole.shape == (count,)
    # a change here changes every converter-made value: it needs a new mmrec.init.INIT_FORMAT
    np.testing.assert_array_equal(whole, _reference_lanes(seed, name, shape, count))
    rng = random.Random(count + seed)
    for _ in range(20):  # any window, starting and ending mid-word, is the same lanes
        first = rng.randrange(count)
        n = rng.randrange(count - first + 1)
        np.testing.assert_array_equal(uniform_lanes(seed, name, shape, first, n), whole[first:first + n])


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_values_are_the_float32_formula_of_the_lanes(shape):
    name = "blocks.0.W_q.weight"
    values = conversion_init(name, shape, seed=3)
    assert values.dtype == torch.float32 and tuple(values.shape) == shape
    expected = _reference_values(3, name, shape)
    np.testing.assert_array_equal(values.numpy().view(np.uint32), expected.view(np.uint32))  # bit for bit
    assert xavier_bound(shape) == pytest.approx(
        math.sqrt(6.0 / ((shape[0] + shape[1]) * math.prod(shape[2:]))), rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_the_float32_value_rounded(dtype):
    name, shape = "blocks.1.mdi.W_context.0.weight", (129, 67)
    rounded = conversion_init(name, shape, seed=5).to(dtype)
    direct = conversion_init(name, shape, seed=5, dtype=dtype)
    assert direct.dtype == dtype
    assert torch.equal(direct, rounded)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}[dtype]
    assert torch.equal(direct.view(bits), rounded.view(bits))  # bit for bit (signed zeros included)
    pieces = [conversion_init(name, shape, seed=5, start=a, stop=b, dtype=dtype)
              for a, b in [(0, 1), (1, 64), (64, 65), (65, 129)]]
    assert torch.equal(torch.cat(pieces).view(bits), rounded.view(bits))


def test_values_strictly_inside_the_bound_on_a_symmetric_grid():
    shape = (2048, 2048)  # 4M values: every one of the 65,536 levels occurs (each is missed with p ~ e^-64)
    values = conversion_init("blocks.0.mdi.W_gamma.2.weight", shape, seed=11)
    bound = xavier_bound(shape)
    step = np.float32(bound / 32768.0)
    top = float(np.float32(32767.5) * step)
    assert values.max().item() == top and values.min().item() == -top  # symmetric about 0
    assert top < bound  # strictly inside (-bound, bound), even after float32 rounding
    assert values.unique().numel() == 65536
    # a symmetric grid: mean ~ 0 (std of the mean of 4M uniform values is ~2.8e-4 bound)
    assert abs(values.double().mean().item()) < 2e-3 * bound
    assert abs(values.double().std().item() - bound / math.sqrt(3)) < 2e-3 * bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_buffer_is_filled_in_place(dtype):
    name, shape = "blocks.0.W_k.weight", (19, 11)
    whole = conversion_init(name, shape, seed=2, dtype=dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    returned = conversion_init(name, shape, seed=2, dtype=dtype, out=out)
    assert returned.data_ptr() == out.data_ptr()
    assert torch.equal(out, whole)
    # the streaming writer reuses one flat buffer for the blocks of a task
    block = torch.full((5 * 11,), float("nan"), dtype=dtype)
    returned = conversion_init(name, shape, seed=2, start=7, stop=12, dtype=dtype, out=block)
    assert returned.data_ptr() == block.data_ptr() and tuple(returned.shape) == (5, 11)
    assert torch.equal(block.view(5, 11), whole[7:12])
    # zeros and ones rules fill the given buffer too, whatever it held
    for rule_name, value in (("blocks.0.W_k.bias", 0.0), ("blocks.0.norm1.weight", 1.0)):
        vec = torch.full((9,), float("nan"), dtype=dtype)
        returned = conversion_init(rule_name, (9,), out=vec, dtype=dtype)
        assert returned.data_ptr() == vec.data_ptr() and torch.equal(vec, torch.full((9,), value, dtype=dtype))


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_rows_of_any_split_equal_the_whole(shape):
    name = "blocks.3.W_g.weight"
    whole = conversion_init(name, shape, seed=9)
    rng = random.Random(shape[0] * 7919 + shape[1])
    for _ in range(6):
        cuts = sorted(rng.randrange(shape[0] + 1) for _ in range(rng.randrange(1, 5)))
        bounds = [0, *cuts, shape[0]]  # may hold empty ranges
        pieces = [conversion_init(name, shape, seed=9, start=a, stop=b) for a, b in zip(bounds, bounds[1:])]
        assert all(tuple(p.shape) == (b - a, *shape[1:]) for p, a, b in zip(pieces, bounds, bounds[1:]))
        assert torch.equal(torch.cat(pieces).view(torch.int32), whole.view(torch.int32))
    rows = [conversion_init(name, shape, seed=9, start=r, stop=r + 1) for r in range(min(shape[0], 40))]
    assert torch.equal(torch.cat(rows), whole[:len(rows)])
