"""Sources: every layout cataloged from headers, and read() equal to torch/safetensors loading."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import fixtures
from mmrec.streaming.sources import SourceCatalog, normalize_name, open_source


def mapped_file(ptr: int) -> str | None:
    """The file whose mapping holds address `ptr` (None: anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) == 6 else None
    return None


def assert_reads_match(catalog: SourceCatalog, reference: dict[str, torch.Tensor]) -> None:
    """Every tensor equals the reference (keyed by original name), whole and in row blocks."""
    assert {t.original_name for t in catalog.tensors.values()} == set(reference)
    for name, t in catalog.tensors.items():
        ref = reference[t.original_name]
        got = catalog.read(name)
        assert got.dtype == ref.dtype and tuple(got.shape) == t.shape == tuple(ref.shape), name
        assert torch.equal(got, ref), name
        if ref.ndim and ref.shape[0] >= 3:
            step = max(1, ref.shape[0] // 3)
            blocks = [catalog.read(name, s, min(s + step, ref.shape[0])) for s in range(0, ref.shape[0], step)]
            assert torch.equal(torch.cat(blocks), ref), name


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_family_safetensors_read_matches_safetensors(family_checkpoints, family):
    path = family_checkpoints[family]
    catalog = open_source(path)
    assert catalog.layout == "safetensors" and catalog.root == path
    assert len(catalog.files) > 1  # really sharded, through the index
    assert catalog.config["model_type"] == family
    assert_reads_match(catalog, fixtures.load_safetensors_dir(path))
    names = [t.original_name for t in catalog.tensors.values()]
    assert [normalize_name(n) for n in names] == list(catalog.tensors)


def test_names_normalized_and_head_names(family_checkpoints):
    gpt2 = open_source(family_checkpoints["gpt2"])
    assert "h.0.attn.c_attn.weight" in gpt2.tensors and "lm_head.weight" not in gpt2.tensors  # tied: omitted
    assert gpt2.tensors["wte.weight"].original_name == "transformer.wte.weight"
    neox = open_source(family_checkpoints["gpt_neox"])
    assert "embed_out.weight" in neox.tensors and "embed_in.weight" in neox.tensors
    llama = open_source(family_checkpoints["llama"])
    assert "layers.0.self_attn.q_proj.weight" in llama.tensors and "lm_head.weight" in llama.tensors


def test_normalize_name_strips_prefixes_in_any_order():
    assert normalize_name("module._orig_mod.model.layers.0.x") == "layers.0.x"
    assert normalize_name("_orig_mod.module.transformer.h.0.x") == "h.0.x"
    assert normalize_name("gpt_neox.layers.0.x") == "layers.0.x"
    assert normalize_name("lm_head.weight") == "lm_head.weight"
    assert normalize_name("layers.0.attention.wq.weight") == "layers.0.attention.wq.weight"


def test_contiguous_reads_are_views_of_a_shared_file_map(family_checkpoints):
    path = family_checkpoints["llama"]
    catalog = open_source(path)
    t = catalog.tensors["layers.1.mlp.up_proj.weight"]
    file, start, end = t.byte_range()
    assert end - start == t.nbytes == 128 * 64 * 4
    block = catalog.read(t.name, 10, 20)
    assert mapped_file(block.data_ptr()) == file  # not an anonymous copy
    with open(file, "rb") as f:  # and byte_range really addresses the tensor's bytes
        f.seek(start)
        raw = bytearray(f.read(end - start))
    assert torch.equal(torch.frombuffer(raw, dtype=torch.float32).view(t.shape), catalog.read(t.name))


def test_pread_fallback_when_mmap_fails(family_checkpoints, monkeypatch):
    catalog = open_source(family_checkpoints["qwen2"])
    monkeypatch.setattr(catalog, "_map", lambda file: None)
    assert_reads_match(catalog, fixtures.load_safetensors_dir(family_checkpoints["qwen2"]))


def test_catalog_pickles_for_workers(family_checkpoints):
    catalog = open_source(family_checkpoints["gemma"])
    catalog.read("embed_tokens.weight")  # opens a map, which must not travel
    clone = pickle.loads(pickle.dumps(catalog))
    assert torch.equal(clone.read("embed_tokens.weight", 5, 9), catalog.read("embed_tokens.weight", 5, 9))


def test_aux_files_and_config(family_checkpoints, llama_layouts):
    catalog = open_source(family_checkpoints["llama"])
    assert {p.name for p in catalog.aux_files} == {"tokenizer.json", "generation_config.json"}
    meta = open_source(llama_layouts["meta"])
    assert meta.config["n_heads"] == 4 and [p.name for p in meta.aux_files] == ["tokenizer.model"]


@pytest.mark.parametrize("layout", ["bin", "pt", "single_file", "bf16"])
def test_llama_layouts_read_same_values(llama_layouts, layout):
    reference = fixtures.load_safetensors_dir(llama_layouts["safetensors"])
    catalog = open_source(llama_layouts[layout])
    if layout == "bf16":
        assert catalog.layout == "safetensors"
        assert {t.dtype for t in catalog.tensors.values()} == {"BF16"}
        reference = {k: v.to(torch.bfloat16) for k, v in reference.items()}
    if layout == "pt":  # {"model": {"module." + name: tensor}, "epoch": 3}
        assert catalog.layout == "torch"
        reference = {"module." + k: v for k, v in reference.items()}
    if layout == "bin":
        assert catalog.layout == "torch" and len(catalog.files) == 3
    assert_reads_match(catalog, reference)
    assert set(catalog.tensors) == set(open_source(llama_layouts["safetensors"]).tensors)


def test_bin_index_file_and_safetensors_index_file_accepted(llama_layouts):
    a = open_source(llama_layouts["bin"] / "pytorch_model.bin.index.json")
    b = open_source(llama_layouts["safetensors"] / "model.safetensors.index.json")
    assert a.layout == "torch" and b.layout == "safetensors" and set(a.tensors) == set(b.tensors)


def test_meta_shards_join(llama_layouts, family_models):
    llama = family_models["llama"]
    full = fixtures.hf_to_meta(fixtures.load_safetensors_dir(llama.path), llama.config)
    catalog = open_source(llama_layouts["meta"])
    assert catalog.layout == "meta" and [f.name for f in catalog.files] == ["consolidated.00.pth",
                                                                         "consolidated.01.pth"]
    assert set(catalog.tensors) == set(full)
    for name, ref in full.items():  # whole reads and row blocks, incl. blocks straddling two shards
        assert torch.equal(catalog.read(name), ref), name
        rows = ref.shape[0]
        for start, stop in [(0, 1), (rows // 2 - 3, rows // 2 + 5), (rows - 2, rows)]:
            assert torch.equal(catalog.read(name, start, stop), ref[start:stop]), (name, start, stop)
    t = catalog.tensors
    assert t["layers.0.attention.wq.weight"].join_dim == 0 and len(t["layers.0.attention.wq.weight"].pieces) == 2
    assert t["layers.0.attention.wo.weight"].join_dim == 1 and t["layers.1.feed_forward.w2.weight"].join_dim == 1
    assert t["tok_embeddings.weight"].join_dim == 1 and t["tok_embeddings.weight"].shape == (256, 64)
    assert t["output.weight"].join_dim == 0
    norm = t["layers.0.attention_norm.weight"]
    assert norm.join_dim is None and len(norm.pieces) == 1 and norm.pieces[0].file.endswith("consolidated.00.pth")
    assert t["layers.0.attention.wq.weight"].byte_range() is None
    # The rotary order is Meta's (the plan permutes), so wq differs from HF's q_proj.
    hf = fixtures.load_safetensors_dir(llama.path)["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(catalog.read("layers.0.attention.wq.weight"), hf)


def test_meta_vocab_parallel_embedding_joins_on_rows(llama_layouts, family_models):
    llama = family_models["llama"]
    catalog = open_source(llama_layouts["meta_vocab_parallel"])
    emb = catalog.tensors["tok_embeddings.weight"]
    assert emb.join_dim == 0 and emb.shape == (256, 64)
    ref = fixtures.load_safetensors_dir(llama.path)["model.embed_tokens.weight"]
    assert torch.equal(catalog.read("tok_embeddings.weight", 120, 140), ref[120:140])


def test_meta_single_shard_file_opens_the_directory(llama_layouts):
    catalog = open_source(llama_layouts["meta"] / "consolidated.01.pth")
    assert catalog.layout == "meta" and len(catalog.files) == 2


def test_torch_zip_strides_offsets_shared_storage_and_wrappers(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    emb = torch.randn(10, 4, dtype=torch.bfloat16)
    state = OrderedDict([
        ("model.embed.weight", emb),
        ("lm_head.weight", emb),  # tied: one storage, two names
        ("transposed", base.t()),  # non-contiguous strides
        ("row_view", base[2:5]),  # a storage offset
        ("param", torch.nn.Parameter(torch.arange(7, dtype=torch.int64), requires_grad=False)),
        ("half", torch.randn(3, dtype=torch.float16)),
        ("scalar", torch.tensor(2.5)),
    ])
    torch.save({"state_dict": state, "step": 10, "note": "hi"}, tmp_path / "ckpt.pth")
    catalog = open_source(tmp_path / "ckpt.pth")
    loaded = torch.load(tmp_path / "ckpt.pth", weights_only=True)["state_dict"]
    assert_reads_match(catalog, dict(loaded))
    t = catalog.tensors
    assert t["embed.weight"].pieces == t["lm_head.weight"].pieces
    assert t["transposed"].byte_range() is None and t["transposed"].pieces[0].strides == (1, 5)
    assert t["row_view"].byte_range() is not None
    assert t["half"].dtype == "F16" and t["param"].dtype == "I64" and t["scalar"].shape == ()
    assert torch.equal(catalog.read("transposed", 1, 3), base.t()[1:3])


def test_fingerprint_stable_and_sensitive(tmp_path, family_checkpoints):
    src = family_checkpoints["gpt2"]
    assert open_source(src).fingerprint() == open_source(src).fingerprint()
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    before = open_source(copy).fingerprint()
    shard = sorted(copy.glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_source(copy).fingerprint() != before


HEADER_ONLY = """
import importlib.util, json, sys, types
if sys.argv[2] == "stub":  # skip mmrec/__init__.py (the runtime), to test only the engine's own imports
    spec = importlib.util.find_spec("mmrec")
    stub = types.ModuleType("mmrec")
    stub.__path__, stub.__spec__ = list(spec.submodule_search_locations), spec
    sys.modules["mmrec"] = stub
from mmrec.streaming.sources import open_source
from mmrec.streaming.analysis import analyze
import mmrec.cli.inspect_cmd
a = analyze(open_source(sys.argv[1]))
print(json.dumps({"torch": "torch" in sys.modules, "model_type": a.model_type}))
"""


@pytest.mark.parametrize("layout", ["safetensors", "bin", "meta", "pt"])
def test_header_only_path_does_not_import_torch(llama_layouts, layout):
    out = subprocess.run([sys.executable, "-c", HEADER_ONLY, str(llama_layouts[layout]), "stub"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"torch": False, "model_type": "llama"}


def test_whole_package_header_only_path_does_not_import_torch(llama_layouts):
    probe = subprocess.run([sys.executable, "-c", "import sys, mmrec; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    if probe.stdout.strip() == "True":
        pytest.xfail("`import mmrec` itself imports torch (mmrec/__init__.py): `mmrec inspect` pays ~2.5 s")
    out = subprocess.run([sys.executable, "-c", HEADER_ONLY, str(llama_layouts["safetensors"]), "full"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"torch": False, "model_type": "llama"}


def test_read_bounds(family_checkpoints):
    catalog = open_source(family_checkpoints["llama"])
    with pytest.raises(IndexError):
        catalog.read("norm.weight", 0, 65)
    with pytest.raises(KeyError):
        catalog.read("nope")
    assert catalog.read("embed_tokens.weight", 7, 7).shape == (0, 64)


def test_catalog_files_are_absolute(family_checkpoints, monkeypatch):
    path = family_checkpoints["phi3"]
    monkeypatch.chdir(path.parent)
    catalog = open_source(Path(path.name))
    assert all(Path(p.file).is_absolute() for t in catalog.tensors.values() for p in t.pieces)
