"""Row-block transforms against plain in-memory torch computations, on real safetensors files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmrec.streaming import ops
from mmrec.streaming import transforms as T
from mmrec.streaming.plan.model import TensorPlan
from mmrec.streaming.sources import open_source


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(37, 23, generator=g),            # awkward sizes: prime rows/cols
        "w_bf16": torch.randn(29, 11, generator=g).to(torch.bfloat16),
        "qkv": torch.randn(3 * 24, 10, generator=g),      # 4 heads of 6, interleaved per head
        "qkv_b": torch.randn(3 * 24, generator=g),
        "k": torch.randn(2 * 6, 10, generator=g),          # 2 kv heads of 6
        "k_b": torch.randn(2 * 6, generator=g),
        "norm": torch.randn(23, generator=g).to(torch.bfloat16),
        "emb": torch.randn(31, 8, generator=g),
    }


@pytest.fixture(scope="module")
def catalog(tensors, tmp_path_factory):
    path = tmp_path_factory.mktemp("tf") / "model.safetensors"
    save_file(tensors, str(path))
    return open_source(path)


def tp(src, ops, shape, dtype="F32"):
    return TensorPlan("t.weight", dtype, tuple(shape), "transform" if ops else "copy", [src], ops, None, 0.8)


def whole(plan, catalog):
    return T.materialize_rows(plan, catalog, 0, plan.shape[0], seed=0)


def chunked(plan, catalog, step):
    parts = [T.materialize_rows(plan, catalog, a, min(plan.shape[0], a + step), 0)
             for a in range(0, plan.shape[0], step)]
    return torch.cat(parts)


def test_transpose_reads_in_bounded_blocks_and_matches(tensors, catalog, monkeypatch):
    plan = tp("w", [{"op": "transpose"}], (23, 37))
    full = whole(plan, catalog)
    assert torch.equal(full, tensors["w"].t())
    monkeypatch.setattr(ops, "READ_BLOCK_BYTES", 3 * 23 * 4)  # 3 source rows per read
    for step in (1, 4, 5, 22, 23):
        out = chunked(plan, catalog, step)
        assert out.is_contiguous() and torch.equal(out, full)


def test_reads_are_bounded_by_the_block(tensors, catalog, monkeypatch):
    seen = []
    real_read = type(catalog).read

    def spy(self, name, start=0, stop=None):
        out = real_read(self, name, start, stop)
        seen.append(out.shape[0])
        return out

    monkeypatch.setattr(type(catalog), "read", spy)
    monkeypatch.setattr(ops, "READ_BLOCK_BYTES", 4 * 23 * 4)
    chunked(tp("w", [{"op": "transpose"}], (23, 37)), catalog, 3)
    assert seen and max(seen) <= 4  # never the whole 37-row source at once
    seen.clear()
    chunked(tp("qkv", [{"op": "take_heads", "num_heads": 4, "parts": 3, "part": 2}], (24, 10)), catalog, 2)
    assert max(seen) < 72  # spans of the rows asked for, not the whole fused tensor


def test_fused_split_after_transpose(tensors, catalog):
    plan = tp("w", [{"op": "transpose"}, {"op": "slice_rows", "start": 5, "stop": 17}], (12, 37))
    assert torch.equal(chunked(plan, catalog, 5), tensors["w"][:, 5:17].t())


def test_take_heads_is_the_neox_interleave(tensors, catalog):
    w, b = tensors["qkv"], tensors["qkv_b"]
    for part in range(3):
        ops = [{"op": "take_heads", "num_heads": 4, "parts": 3, "part": part}]
        expect = w.view(4, 3, 6, 10)[:, part].reshape(24, 10)
        assert torch.equal(chunked(tp("qkv", ops, (24, 10)), catalog, 7), expect)
        expect_b = b.view(4, 3, 6)[:, part].reshape(24)
        assert torch.equal(chunked(tp("qkv_b", ops, (24,)), catalog, 5), expect_b)


def test_gathers_read_runs_when_the_span_is_sparse(tensors, catalog, monkeypatch):
    monkeypatch.setattr(ops, "GATHER_SPAN_FACTOR", 0)  # always read contiguous runs, never the span
    monkeypatch.setattr(ops, "GATHER_SPAN_SLACK", 0)
    w = tensors["qkv"]
    plan = tp("qkv", [{"op": "take_heads", "num_heads": 4, "parts": 3, "part": 1}], (24, 10))
    assert torch.equal(chunked(plan, catalog, 9), w.view(4, 3, 6, 10)[:, 1].reshape(24, 10))
    plan = tp("qkv", [{"op": "rotary_meta_to_hf", "num_heads": 6}], (72, 10))
    assert torch.equal(chunked(plan, catalog, 11), w.view(6, 6, 2, 10).transpose(1, 2).reshape(72, 10))


def test_repeat_kv_heads_matches_hf_repeat_kv(tensors, catalog):
    ops = [{"op": "repeat_kv_heads", "num_kv_heads": 2, "num_heads": 6}]
    k = tensors["k"]
    expect = k.view(2, 1, 6, 10).expand(2, 3, 6, 10).reshape(36, 10)  # HF repeat_kv on the weight rows
    assert torch.equal(chunked(tp("k", ops, (36, 10)), catalog, 7), expect)
    expect_b = tensors["k_b"].view(2, 1, 6).expand(2, 3, 6).reshape(36)
    assert torch.equal(chunked(tp("k_b", ops, (36,)), catalog, 5), expect_b)


def test_rotary_meta_to_hf_inverts_metas_permute(tensors, catalog):
    # the permute of transformers' convert_llama_weights_to_hf, applied to the whole tensor
    w, heads = tensors["qkv"], 6  # 72 rows, heads of 12
    expect = w.view(heads, 72 // heads // 2, 2, 10).transpose(1, 2).reshape(72, 10)
    plan = tp("qkv", [{"op": "rotary_meta_to_hf", "num_heads": heads}], (72, 10))
    for step in (1, 5, 13, 72):
        assert torch.equal(chunked(plan, catalog, step), expect)


def test_add_and_cast_gemma_norm(tensors, catalog):
    plan = tp("norm", [{"op": "add", "value": 1.0}], (23,), dtype="BF16")
    expect = (tensors["norm"].float() + 1.0).to(torch.bfloat16)
    out = chunked(plan, catalog, 4)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expect)


def test_cast_bf16_to_f32_is_exact(tensors, catalog):
    plan = tp("w_bf16", [{"op": "cast", "dtype": "F32"}], (29, 11))
    assert torch.equal(chunked(plan, catalog, 6), tensors["w_bf16"].float())


def test_pad_rows_with_the_mean(tensors, catalog, monkeypatch):
    e = tensors["emb"]
    plan = tp("emb", [{"op": "pad_rows", "rows": 9, "fill": "mean"}], (40, 8))
    full = whole(plan, catalog)
    assert torch.equal(full[:31], e)
    expect_mean = e.double().mean(0).float()
    assert torch.allclose(full[31:], expect_mean.expand(9, 8), atol=1e-7, rtol=0)
    monkeypatch.setattr(ops, "MEAN_BLOCK_BYTES", 1)  # the mean's blocks come from the shape, not the call
    for step in (3, 7, 30, 31, 32):
        assert torch.equal(chunked(plan, catalog, step)[:31], full[:31])


def test_truncate_rows(tensors, catalog):
    plan = tp("emb", [{"op": "slice_rows", "start": 0, "stop": 20}], (20, 8))
    assert torch.equal(chunked(plan, catalog, 6), tensors["emb"][:20])


def test_init_is_chunk_independent():
    plan = TensorPlan("blocks.0.mdi.W_g.weight", "BF16", (13, 26), "init", [], [], "xavier_uniform", 0.0)
    full = T.materialize_rows(plan, None, 0, 13, seed=3)
    assert full.dtype == torch.bfloat16
    assert torch.equal(chunked_init(plan, 4, 3), full)
    assert not torch.equal(T.materialize_rows(plan, None, 0, 13, seed=4), full)
    ones = TensorPlan("norm.weight", "F32", (5,), "init", [], [], "ones", 0.0)
    assert torch.equal(T.materialize_rows(ones, None, 1, 4, 0), torch.ones(3))


def chunked_init(plan, step, seed):
    return torch.cat([T.materialize_rows(plan, None, a, min(plan.shape[0], a + step), seed)
                      for a in range(0, plan.shape[0], step)])


def test_copy_range_points_at_the_bytes(tensors, catalog):
    plain = tp("w", [], (37, 23))
    file, start, end = T.copy_range(plain, catalog)
    with open(file, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    assert raw == tensors["w"].numpy().tobytes()
    sliced = tp("w", [{"op": "slice_rows", "start": 4, "stop": 9}], (5, 23))
    file, start, end = T.copy_range(sliced, catalog)
    with open(file, "rb") as f:
        f.seek(start)
        assert f.read(end - start) == tensors["w"][4:9].numpy().tobytes()
    assert T.copy_range(tp("w", [{"op": "transpose"}], (23, 37)), catalog) is None
    assert T.copy_range(tp("w_bf16", [], (29, 11), dtype="F32"), catalog) is None  # needs a cast


def test_rows_per_block_fits_the_budget():
    plan = tp("w", [{"op": "transpose"}], (23, 37))
    assert T.rows_per_block(plan, 1) == 1
    n = T.rows_per_block(plan, 10_000)
    assert 1 <= n <= 23 and n * 37 * 4 <= 10_000
    assert T.rows_per_block(tp("w", [], (37, 23)), 1 << 30) == 37


def test_infer_shape_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="outside"):
        T.infer_shape([{"op": "slice_rows", "start": 0, "stop": 50}], (37, 23))
    with pytest.raises(ValueError, match="heads"):
        T.infer_shape([{"op": "take_heads", "num_heads": 5, "parts": 3, "part": 0}], (72, 10))
    with pytest.raises(ValueError, match="unknown"):
        T.check_ops([{"op": "reshape"}])
