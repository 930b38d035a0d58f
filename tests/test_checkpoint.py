"""save_pretrained / from_pretrained against docs/checkpoint-format.md."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmrec import MMRecConfig, MMRecModel, parameter_specs
from mmrec.checkpoint import CheckpointError, parse_size


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(vocab_size=97, model_dim=32, num_layers=3, num_heads=4, memory_slots=16, hds_levels=2,
                  memory_segment_len=4, dropout=0.0)
    values.update(overrides)
    return MMRecModel(MMRecConfig(**values)).eval()


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_sharded_round_trip_with_index_and_tied_weight_stored_once(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = [s.name for s in parameter_specs(model.config)]
    assert sorted(index["weight_map"]) == sorted(names) and "lm_head.weight" not in index["weight_map"]
    stored = 0
    for file in files:  # the safetensors library itself reads what we wrote
        with safe_open(tmp_path / file, framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == file
                assert torch.equal(f.get_tensor(key), model.state_dict()[key])
                stored += f.get_tensor(key).numel() * 4
    assert index["metadata"]["total_size"] == stored
    loaded = MMRecModel.from_pretrained(tmp_path)
    assert_same_parameters(model, loaded)
    assert loaded.lm_head.weight is loaded.embedding.weight
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_headers_are_aligned(tmp_path):
    model = make_model(ffn_gated=True, tie_word_embeddings=False)
    model.save_pretrained(tmp_path, max_shard_size="5GB", dtype=torch.bfloat16)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert (8 + header_len) % 8 == 0
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = MMRecModel.from_pretrained(tmp_path)
    assert loaded.embedding.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    as_float = MMRecModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_float.norm.weight.dtype == torch.float32


def test_single_file_loads_with_its_embedded_config(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    single = tmp_path / "alone.safetensors"
    os.rename(tmp_path / "ckpt" / "model.safetensors", single)
    assert_same_parameters(model, MMRecModel.from_pretrained(single))


def test_cpu_load_is_memory_mapped_not_copied(tmp_path):
    model = make_model(model_dim=256, num_layers=4, vocab_size=4000)
    model.save_pretrained(tmp_path)
    loaded = MMRecModel.from_pretrained(tmp_path)
    # Every parameter is a view of the file's map: writing to the file's pages would show through, and
    # the storage is not owned by torch's allocator (it cannot be resized).
    for name, param in loaded.named_parameters():
        with pytest.raises(RuntimeError):
            param.untyped_storage().resize_(0)


def test_reference_style_state_dict_with_both_tied_names_loads(tmp_path):
    model = make_model()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state
    save_file(state, tmp_path / "model.safetensors")
    model.config.save(tmp_path)
    assert_same_parameters(model, MMRecModel.from_pretrained(tmp_path))


def test_missing_unexpected_and_misshaped_tensors_are_one_error(tmp_path):
    model = make_model()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del state["blocks.1.mdi.W_g.weight"]
    state["blocks.0.norm1.weight"] = torch.ones(5)
    state["extra.tensor"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    model.config.save(tmp_path)
    with pytest.raises(CheckpointError) as err:
        MMRecModel.from_pretrained(tmp_path)
    message = str(err.value)
    for words in ("blocks.1.mdi.W_g.weight", "blocks.0.norm1.weight", "[5]", "extra.tensor"):
        assert words in message


def test_partial_checkpoint_loads_with_strict_false(tmp_path):
    model = make_model()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight" and ".mdi." not in k}
    state["unused"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    model.config.save(tmp_path)
    loaded = MMRecModel.from_pretrained(tmp_path, strict=False)
    assert torch.equal(loaded.blocks[0].W_q.weight, model.blocks[0].W_q.weight)
    assert torch.equal(loaded.blocks[0].mdi.W_g.bias, torch.zeros(32))
    assert loaded.blocks[0].mdi.W_g.weight.abs().max() > 0
    assert all(p.device.type == "cpu" for p in loaded.parameters())


@pytest.mark.parametrize("text, value", [("5GB", 5 * 10**9), ("200KB", 200_000), ("1.5MB", 1_500_000),
                                         ("2GiB", 2 * 2**30), ("123", 123)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["0", "-1GB", "5XB", "GB", ""])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_load_straight_to_gpu(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    loaded = MMRecModel.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.norm.weight.cpu(), model.norm.weight.to(torch.bfloat16))


def test_single_file_prefers_its_own_config_over_a_foreign_neighbour(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    single = tmp_path / "mmrec.safetensors"
    os.rename(tmp_path / "ckpt" / "model.safetensors", single)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert_same_parameters(model, MMRecModel.from_pretrained(single))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_streamed_gpu_load_equals_the_cpu_load(tmp_path):
    """Tensors bigger than the pinned buffers, several files, a dtype change, and the stored dtype."""
    from mmrec import device_load

    model = make_model(model_dim=64, vocab_size=3000)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    original = device_load.CHUNK_BYTES
    device_load.CHUNK_BYTES = 4096  # many chunks per tensor: both buffers cycle
    try:
        for dtype in (None, torch.bfloat16):
            on_gpu = MMRecModel.from_pretrained(tmp_path, device="cuda", dtype=dtype)
            on_cpu = MMRecModel.from_pretrained(tmp_path, dtype=dtype)
            for name, param in on_cpu.state_dict().items():
                assert torch.equal(on_gpu.state_dict()[name].cpu(), param), name
    finally:
        device_load.CHUNK_BYTES = original
