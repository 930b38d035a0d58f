"""Real test checkpoints, written by transformers and torch into temporary directories.

Tiny random models of the nine supported families (hidden 64, 2 layers, 4 heads) saved with
`save_pretrained(max_shard_size="200KB")`, plus the other layouts of one llama: `.bin` shards with an
index, Meta's tensor-parallel consolidated.NN.pth + params.json, a wrapped and prefixed `.pt`, a single
`model.safetensors` and a bf16 copy. Heavy imports stay inside the functions (pytest collects this file).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj")
SEED = 1234
TOKENS = dict(bos_token_id=1, eos_token_id=2)


def family_config(family: str):
    """The transformers config of a tiny model of `family`."""
    import transformers as T

    llama_like = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, **TOKENS)
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **llama_like)
    if family == "mistral":
        return T.MistralConfig(num_key_value_heads=2, **llama_like)
    if family == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **{**llama_like, "vocab_size": 200})
    if family == "gemma":
        return T.GemmaConfig(num_key_value_heads=4, head_dim=16, **{**llama_like, "vocab_size": 192})
    if family == "phi3":
        return T.Phi3Config(num_key_value_heads=4, pad_token_id=0, **{**llama_like, "intermediate_size": 96})
    if family == "gpt2":
        return T.GPT2Config(vocab_size=240, n_embd=64, n_layer=2, n_head=4, n_positions=64, **TOKENS)
    if family == "gpt_neo":
        return T.GPTNeoConfig(vocab_size=160, hidden_size=64, num_layers=2, num_heads=4,
                              attention_types=[[["global", "local"], 1]], max_position_embeddings=64, **TOKENS)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=160, max_position_embeddings=64, **TOKENS)
    if family == "gptj":
        return T.GPTJConfig(vocab_size=224, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                            **TOKENS)
    raise KeyError(family)


@dataclasses.dataclass
class FamilyCheckpoint:
    family: str
    path: Path  # directory written by save_pretrained
    config: object  # the transformers config
    num_parameters: int  # model.num_parameters(): tied weights counted once


def make_family_checkpoint(family: str, out: Path) -> FamilyCheckpoint:
    import torch
    import transformers as T

    torch.manual_seed(SEED)
    config = family_config(family)
    model = T.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, max_shard_size="200KB")
    (out / "tokenizer.json").write_text('{"version": "1.0"}')  # an aux file to be copied
    return FamilyCheckpoint(family, out, config, model.num_parameters())


def load_safetensors_dir(path: Path) -> dict:
    """name -> tensor of every .safetensors file in a directory (the names as stored)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_bin_shards(state: dict, out: Path, num_shards: int = 3) -> None:
    """HF's sharded .bin layout, written with torch.save (transformers 5 no longer writes it)."""
    import torch

    out.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = {n: state[n] for n in names[i::num_shards]}
        torch.save(part, out / file)
        weight_map.update({n: file for n in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# -- Meta's layout -------------------------------------------------------------------------------------
def meta_permute(w, n_heads: int):
    """Inverse of convert_llama_weights_to_hf's permute: HF rotary order -> Meta's interleaved order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta(state: dict, config) -> dict:
    """Full (unsplit) Meta-named tensors of an HF llama state dict (names without 'model.')."""
    s = {k.removeprefix("model."): v for k, v in state.items()}
    out = {"tok_embeddings.weight": s["embed_tokens.weight"], "norm.weight": s["norm.weight"],
           "output.weight": s["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        out[p + "attention.wq.weight"] = meta_permute(s[p + "self_attn.q_proj.weight"], config.num_attention_heads)
        out[p + "attention.wk.weight"] = meta_permute(s[p + "self_attn.k_proj.weight"], config.num_key_value_heads)
        out[p + "attention.wv.weight"] = s[p + "self_attn.v_proj.weight"]
        out[p + "attention.wo.weight"] = s[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = s[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w2.weight"] = s[p + "mlp.down_proj.weight"]
        out[p + "feed_forward.w3.weight"] = s[p + "mlp.up_proj.weight"]
        out[p + "attention_norm.weight"] = s[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = s[p + "post_attention_layernorm.weight"]
    return out


META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def write_meta(full: dict, config, out: Path, num_shards: int = 2, embedding_dim: int = 1) -> None:
    """consolidated.NN.pth tensor-parallel shards + params.json (norms repeated in every shard)."""
    import torch

    out.mkdir(parents=True)
    shards = [{} for _ in range(num_shards)]
    for name, w in full.items():
        kind = name.split(".")[-2]
        dim = embedding_dim if kind == "tok_embeddings" else META_SPLIT.get(kind)
        for i in range(num_shards):
            shards[i][name] = w.clone() if dim is None else w.chunk(num_shards, dim)[i].clone()
    for i, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers,
              "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
              "vocab_size": -1 if embedding_dim == 1 else config.vocab_size, "multiple_of": 32,
              "norm_eps": config.rms_norm_eps, "rope_theta": 10000.0}
    (out / "params.json").write_text(json.dumps(params))
    (out / "tokenizer.model").write_bytes(b"\x00sentencepiece stand-in")


def make_llama_layouts(llama: FamilyCheckpoint, out: Path) -> dict[str, Path]:
    """The same llama in every other layout."""
    import torch
    import transformers as T

    state = load_safetensors_dir(llama.path)
    config_json = llama.path / "config.json"
    layouts = {"safetensors": llama.path}

    layouts["bin"] = out / "bin"
    write_bin_shards(state, layouts["bin"])
    shutil.copy(config_json, layouts["bin"])

    full = hf_to_meta(state, llama.config)
    layouts["meta"] = out / "meta"
    write_meta(full, llama.config, layouts["meta"])
    layouts["meta_vocab_parallel"] = out / "meta_vocab_parallel"  # LLaMA 3 style embedding split
    write_meta(full, llama.config, layouts["meta_vocab_parallel"], embedding_dim=0)

    pt_dir = out / "pt"
    pt_dir.mkdir()
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}, pt_dir / "model.pt")
    shutil.copy(config_json, pt_dir)
    layouts["pt"] = pt_dir / "model.pt"

    torch.manual_seed(SEED)
    model = T.AutoModelForCausalLM.from_config(llama.config)
    model.load_state_dict(state)
    layouts["single_file"] = out / "single" / "model.safetensors"
    model.save_pretrained(layouts["single_file"].parent)  # 1 file, well under the default shard size
    layouts["bf16"] = out / "bf16"
    model.to(torch.bfloat16).save_pretrained(layouts["bf16"], max_shard_size="100KB")
    return layouts
