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
