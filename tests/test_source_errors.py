"""Bad inputs: each is one SourceError that names the file (and tensor) and what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmrec.streaming.analysis import analyze
from mmrec.streaming.sources import SourceError, open_source


def raises(path, *fragments) -> str:
    """open_source(path) fails with one SourceError whose message holds every fragment."""
    with pytest.raises(SourceError) as info:
        open_source(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.fixture
def llama_copy(family_checkpoints, tmp_path) -> Path:
    dst = tmp_path / "llama"
    shutil.copytree(family_checkpoints["llama"], dst)
    return dst


def test_missing_path(tmp_path):
    raises(tmp_path / "nope", "nope", "does not exist")


def test_empty_directory_and_directory_without_weights(tmp_path):
    raises(tmp_path, str(tmp_path), "no weights found")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"PK\x03\x04not weights")
    raises(tmp_path, "no weights found")


def test_truncated_safetensors(llama_copy):
    shard = sorted(llama_copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    raises(llama_copy, shard.name, "truncated")


def test_header_larger_than_file(tmp_path):
    write_raw_safetensors(tmp_path / "a.safetensors", {}, length=10_000)
    raises(tmp_path / "a.safetensors", "a.safetensors", "larger than the file")


def test_invalid_json_header(tmp_path):
    write_raw_safetensors(tmp_path / "a.safetensors", b"{not json")
    raises(tmp_path / "a.safetensors", "a.safetensors", "not valid JSON")


def test_overlapping_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    write_raw_safetensors(tmp_path / "a.safetensors", header, b"\0" * 12)
    raises(tmp_path / "a.safetensors", "a.safetensors", "'b'", "overlaps")


def test_out_of_range_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    write_raw_safetensors(tmp_path / "a.safetensors", header, b"\0" * 8)
    raises(tmp_path / "a.safetensors", "a.safetensors", "truncated")


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F42", "shape": [1], "data_offsets": [0, 4]}}
    write_raw_safetensors(tmp_path / "a.safetensors", header, b"\0" * 4)
    raises(tmp_path / "a.safetensors", "a.safetensors", "'w'", "unknown dtype")


def _rewrite_index(directory: Path, new_file: str) -> Path:
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = new_file
    index.write_text(json.dumps(data))
    return index


def test_index_names_missing_file(llama_copy):
    _rewrite_index(llama_copy, "model-00009-of-00009.safetensors")
    raises(llama_copy, "model.safetensors.index.json", "model-00009-of-00009.safetensors", "does not exist")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd"])
def test_index_path_outside_directory(llama_copy, bad):
    (llama_copy.parent / "outside.safetensors").write_bytes(b"x")
    _rewrite_index(llama_copy, bad)
    raises(llama_copy, "model.safetensors.index.json", bad, "outside its directory")


def test_index_symlink_leading_out(llama_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"x": torch.zeros(2)}, outside)
    (llama_copy / "link.safetensors").symlink_to(outside)
    _rewrite_index(llama_copy, "link.safetensors")
    raises(llama_copy, "model.safetensors.index.json", "link.safetensors", "outside its directory")


def test_stale_index(llama_copy):
    index = llama_copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.9.extra.weight"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    raises(llama_copy, "model.safetensors.index.json", "model.layers.9.extra.weight")


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"model.a": torch.zeros(2), "b": torch.zeros(1)}, tmp_path / "one.safetensors")
    save_file({"model.a": torch.ones(2)}, tmp_path / "two.safetensors")
    raises(tmp_path, "'model.a'", "twice", "one.safetensors", "two.safetensors")


def test_normalized_name_collision(tmp_path):
    save_file({"model.norm.weight": torch.zeros(2), "norm.weight": torch.ones(2)}, tmp_path / "a.safetensors")
    raises(tmp_path, "'model.norm.weight'", "'norm.weight'", "normalize")


def test_legacy_torch_file(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    raises(tmp_path / "old.pt", "old.pt", "legacy")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_git_lfs_pointer(tmp_path, name):
    (tmp_path / name).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    raises(tmp_path / name, name, "Git LFS pointer")
    raises(tmp_path, name, "Git LFS pointer")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this opens (creates) the marker file
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_before_running(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "evil": _Evil(marker)}, tmp_path / "evil.pt")
    raises(tmp_path / "evil.pt", "evil.pt", "refusing to unpickle", "io.open")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # proof that the file really runs code
    assert marker.exists()


def test_bad_pickle_global_in_bin_shard(llama_copy, tmp_path):
    bad = tmp_path / "bin"
    bad.mkdir()
    torch.save({"x": torch.zeros(1), "y": os.getcwd}, bad / "pytorch_model-00001-of-00001.bin")
    (bad / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"x": "pytorch_model-00001-of-00001.bin"}}))
    raises(bad, "pytorch_model-00001-of-00001.bin", "refusing to unpickle", "getcwd")


def test_truncated_torch_zip(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    raises(tmp_path / "w.pt", "w.pt")


def test_torch_zip_with_storage_past_the_end(tmp_path):
    """A zip whose central directory claims more storage bytes than exist."""
    torch.save({"w": torch.zeros(16)}, tmp_path / "w.pt")
    with zipfile.ZipFile(tmp_path / "w.pt") as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(tmp_path / "bad.pt", "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            zf.writestr(name.replace("w/", "bad/"), data[:8] if name.endswith("data/0") else data)
    raises(tmp_path / "bad.pt", "bad.pt", "storage 0")


def test_meta_without_params_and_with_gap(llama_layouts, tmp_path):
    d = tmp_path / "meta"
    shutil.copytree(llama_layouts["meta"], d)
    (d / "params.json").unlink()
    raises(d, "no params.json")
    shutil.copy(llama_layouts["meta"] / "params.json", d)
    (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
    raises(d, "numbered [0, 2]")


def test_meta_shards_disagree(llama_layouts, tmp_path):
    d = tmp_path / "meta"
    shutil.copytree(llama_layouts["meta"], d)
    shard = torch.load(d / "consolidated.01.pth", weights_only=True)
    del shard["norm.weight"]
    torch.save(shard, d / "consolidated.01.pth")
    raises(d, "consolidated.01.pth", "norm.weight")


def test_invalid_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{oops")
    raises(llama_copy, "config.json", "not valid JSON")


def test_unknown_family_points_to_mapping(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "falcon"
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"falcon.*--mapping"):
        analyze(open_source(llama_copy))


def test_unknown_names_without_config_point_to_mapping(tmp_path):
    save_file({"encoder.block.0.w": torch.zeros(2)}, tmp_path / "a.safetensors")
    with pytest.raises(SourceError, match="--mapping"):
        analyze(open_source(tmp_path))


def test_config_contradicting_shapes(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["hidden_size"] = 128
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="model_dim = 128 but the tensors give 64"):
        analyze(open_source(llama_copy))


def test_not_a_checkpoint_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    raises(tmp_path / "notes.txt", "notes.txt", "not a checkpoint file")
