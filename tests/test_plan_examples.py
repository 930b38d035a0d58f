"""Two worked examples (LLaMA-7B and GPT-2 to MM-Rec), planned from header-only sources: sparse safetensors
files whose tensor data is never written (f.truncate), so a 13 GB LLaMA-7B costs a few KB of disk."""

from __future__ import annotations

import json

import pytest

from mmrec.safetensors_format import layout_header
from mmrec.streaming.analysis import analyze
from mmrec.streaming.plan import build_plan
from mmrec.streaming.report import build_report, summary_text
from mmrec.streaming.sources import open_source


def sparse_checkpoint(root, entries, config):
    root.mkdir()
    header, offsets = layout_header(entries)
    with open(root / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(max(end for _, end in offsets.values()))
    (root / "config.json").write_text(json.dumps(config))
    return root


def llama_7b(root):
    d, f, v, layers = 4096, 11008, 32000, 32
    entries = [("model.embed_tokens.weight", "F16", (v, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [(p + f"self_attn.{n}_proj.weight", "F16", (d, d)) for n in "qkvo"]
        entries += [(p + "mlp.gate_proj.weight", "F16", (f, d)), (p + "mlp.up_proj.weight", "F16", (f, d)),
                    (p + "mlp.down_proj.weight", "F16", (d, f)), (p + "input_layernorm.weight", "F16", (d,)),
                    (p + "post_attention_layernorm.weight", "F16", (d,))]
    entries += [("model.norm.weight", "F16", (d,)), ("lm_head.weight", "F16", (v, d))]
    config = {"model_type": "llama", "vocab_size": v, "hidden_size": d, "intermediate_size": f,
              "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32,
              "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float16"}
    return sparse_checkpoint(root, entries, config)


def gpt2_small(root):
    d, v, layers = 768, 50257, 12
    entries = [("wte.weight", "F32", (v, d)), ("wpe.weight", "F32", (1024, d))]
    for i in range(layers):
        p = f"h.{i}."
        entries += [(p + "ln_1.weight", "F32", (d,)), (p + "ln_1.bias", "F32", (d,)),
                    (p + "attn.c_attn.weight", "F32", (d, 3 * d)), (p + "attn.c_attn.bias", "F32", (3 * d,)),
                    (p + "attn.c_proj.weight", "F32", (d, d)), (p + "attn.c_proj.bias", "F32", (d,)),
                    (p + "ln_2.weight", "F32", (d,)), (p + "ln_2.bias", "F32", (d,)),
                    (p + "mlp.c_fc.weight", "F32", (d, 4 * d)), (p + "mlp.c_fc.bias", "F32", (4 * d,)),
                    (p + "mlp.c_proj.weight", "F32", (4 * d, d)), (p + "mlp.c_proj.bias", "F32", (d,))]
    entries += [("ln_f.weight", "F32", (d,)), ("ln_f.bias", "F32", (d,))]
    config = {"model_type": "gpt2", "vocab_size": v, "n_embd": d, "n_layer": layers, "n_head": 12,
              "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    return sparse_checkpoint(root, entries, config)


def _check(plan, label):
    report = build_report(plan)
    share = report["transferred_parameter_share"]
    print(f"\n{label}: transferred parameter share {share:.4f} "
          f"({report['transferred_parameters']:,} of {report['total_parameters']:,})\n{summary_text(report)}")
    assert 0.0 < share < 1.0
    assert share == report["transferred_parameters"] / report["total_parameters"]
    assert report["converted_keys"] + len(report["missing_keys"]) == report["total_keys"]
    return report


@pytest.mark.parametrize("mapping", ["default", "extended"])
def test_guide_llama_7b_to_mmrec_7b(tmp_path, mapping):
    catalog = open_source(llama_7b(tmp_path / "llama-7b"))
    plan = build_plan(catalog, analyze(catalog),
                      {"vocab_size": 32000, "model_dim": 4096, "num_layers": 24, "num_heads": 32},
                      mapping=mapping)
    report = _check(plan, f"LLaMA-7B -> MM-Rec-7B ({mapping})")
    assert plan.layer_map == list(range(24))
    assert len([d for d in plan.dropped if d.startswith("layers.31.")]) == 9
    assert plan.target_config["ffn_gated"] and plan.target_config["ffn_dim"] == 11008
    assert plan.target_config["torch_dtype"] == "float16"
    assert report["compatibility_scores"]["blocks.0.ffn_gate.weight"] == 1.0


@pytest.mark.parametrize("mapping", ["default", "extended"])
def test_guide_gpt2_to_mmrec(tmp_path, mapping):
    catalog = open_source(gpt2_small(tmp_path / "gpt2"))
    plan = build_plan(catalog, analyze(catalog),
                      {"vocab_size": 50257, "model_dim": 768, "num_layers": 12, "num_heads": 12}, mapping=mapping)
    _check(plan, f"GPT-2 small -> MM-Rec ({mapping})")
    assert "wpe.weight" in plan.dropped and plan.target_config["tie_word_embeddings"]
    assert plan.target_config["ffn_dim"] == 3072 and plan.target_config["ffn_act"] == "gelu_tanh"
