"""Analysis values equal the transformers config (and model) that wrote each checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fixtures
from mmrec.streaming.analysis import analyze
from mmrec.streaming.sources import open_source

GATED = {"llama", "mistral", "qwen2", "gemma", "phi3"}


def expected(family: str, config) -> dict:
    """The analysis fields as the transformers config defines them (attribute_map gives common names)."""
    heads = config.num_attention_heads
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    act = (getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
           or config.activation_function)
    eps = next(getattr(config, k) for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
               if hasattr(config, k))
    return {
        "model_type": family, "vocab_size": config.vocab_size, "model_dim": config.hidden_size,
        "num_layers": config.num_hidden_layers, "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads, "ffn_dim": ffn,
        "tied_embeddings": config.tie_word_embeddings, "dtype": "F32", "hidden_act": act,
        "gated_mlp": family in GATED, "norm_eps": eps, "guessed": [],
    }


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_analysis_matches_transformers_config(family_models, family):
    model = family_models[family]
    catalog = open_source(model.path)
    got = analyze(catalog).to_dict()
    for key, value in expected(family, model.config).items():
        assert got[key] == value, (key, got[key], value)
    assert got["num_parameters"] == model.num_parameters  # model.num_parameters(): tied weights once
    stored = fixtures.load_safetensors_dir(model.path)
    assert got["total_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert got["files"] == [str(f) for f in catalog.files] and got["layout"] == "safetensors"
    json.dumps(got)  # JSON-able


def test_family_spot_checks(family_models):
    a = {f: analyze(open_source(m.path)) for f, m in family_models.items()}
    assert a["gpt2"].ffn_dim == 256 and a["gpt2"].hidden_act == "gelu_new"  # n_inner None -> 4 * n_embd
    assert a["gemma"].tied_embeddings and a["gemma"].hidden_act == "gelu_pytorch_tanh"
    assert a["phi3"].ffn_dim == 96  # fused gate_up_proj holds 2 * ffn rows
    assert a["gpt_neox"].ffn_dim == 160 and not a["gpt_neox"].tied_embeddings
    assert a["llama"].num_kv_heads == 2 and a["gptj"].num_kv_heads == 4


@pytest.mark.parametrize("layout", ["bin", "pt", "single_file", "bf16", "meta", "meta_vocab_parallel"])
def test_every_llama_layout_gives_the_same_analysis(family_models, llama_layouts, layout):
    base = analyze(open_source(llama_layouts["safetensors"])).to_dict()
    got = analyze(open_source(llama_layouts[layout])).to_dict()
    for key in ("model_type", "vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "ffn_dim", "tied_embeddings", "num_parameters", "hidden_act", "gated_mlp", "norm_eps"):
        assert got[key] == base[key], (key, got[key], base[key])
    if layout == "bf16":
        assert got["dtype"] == "BF16" and got["total_bytes"] == base["total_bytes"] // 2
    else:
        assert got["dtype"] == "F32" and got["total_bytes"] == base["total_bytes"]
    if layout == "meta":  # params.json says vocab_size -1 and never states the FFN width
        assert got["layout"] == "meta" and got["guessed"] == ["vocab_size", "ffn_dim"]
    elif layout == "meta_vocab_parallel":
        assert got["guessed"] == ["ffn_dim"]
    else:
        assert got["guessed"] == []


def test_without_config_values_are_guessed_and_say_so(llama_layouts, family_checkpoints, tmp_path):
    pt = tmp_path / "model.pt"
    shutil.copy(llama_layouts["pt"], pt)  # no config.json beside it
    a = analyze(open_source(pt))
    assert a.model_type == "llama" and a.vocab_size == 256 and a.model_dim == 64 and a.num_layers == 2
    assert a.ffn_dim == 128
    assert set(a.guessed) == {"model_type", "vocab_size", "model_dim", "num_layers", "ffn_dim", "num_heads",
                              "head_dim", "num_kv_heads"}
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (2, 1, 32)  # a guess that fits q and k rows

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(family_checkpoints["gpt2"], gpt2)
    (gpt2 / "config.json").unlink()
    b = analyze(open_source(gpt2))
    assert b.model_type == "gpt2" and b.ffn_dim == 256 and b.tied_embeddings and b.vocab_size == 240
    assert "model_type" in b.guessed and "num_heads" in b.guessed


def test_tied_storage_in_a_bin_counts_once(family_models, tmp_path):
    """torch.save of a tied model's state_dict stores one storage under two names."""
    import transformers as T

    m = family_models["gpt2"]
    model = T.AutoModelForCausalLM.from_config(m.config)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(m.path / "config.json", tmp_path)
    catalog = open_source(tmp_path)
    a = analyze(catalog)
    assert "lm_head.weight" in catalog.tensors and a.tied_embeddings
    assert a.num_parameters == model.num_parameters()
