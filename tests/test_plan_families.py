"""Every transferred tensor of all nine families equals a hand-written in-memory conversion of the files."""

from __future__ import annotations

import pytest
import torch

import fixtures
from mmrec.streaming.analysis import analyze
from mmrec.streaming.plan import build_plan
from mmrec.streaming.sources import open_source
from mmrec.streaming.transforms import materialize_rows


def _repeat_kv(w, kv_heads, heads):
    hd = w.shape[0] // kv_heads
    rep = heads // kv_heads
    return w.reshape(kv_heads, 1, hd, *w.shape[1:]).expand(kv_heads, rep, hd, *w.shape[1:]).reshape(
        heads * hd, *w.shape[1:])


def source_roles(family, s, cfg, i):
    """The canonical (HF Linear) q/k/v/o/up/down/gate/norms of layer i, computed whole, by hand."""
    if family in ("llama", "mistral", "qwen2", "gemma"):
        p = f"model.layers.{i}."
        r = {n: s[p + f"self_attn.{n}_proj.weight"] for n in "qkvo"}
        r.update({n: s[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")})
        r["attn_norm"], r["mlp_norm"] = s[p + "input_layernorm.weight"], s[p + "post_attention_layernorm.weight"]
        if family == "qwen2":
            r.update({f"{n}_bias": s[p + f"self_attn.{n}_proj.bias"] for n in "qkv"})
        if family == "gemma":
            r["attn_norm"], r["mlp_norm"] = r["attn_norm"] + 1, r["mlp_norm"] + 1
        return r
    if family == "phi3":
        p, d, f = f"model.layers.{i}.", cfg.hidden_size, cfg.intermediate_size
        kvd = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
        qkv, gu = s[p + "self_attn.qkv_proj.weight"], s[p + "mlp.gate_up_proj.weight"]
        return {"q": qkv[:d], "k": qkv[d:d + kvd], "v": qkv[d + kvd:], "o": s[p + "self_attn.o_proj.weight"],
                "gate": gu[:f], "up": gu[f:], "down": s[p + "mlp.down_proj.weight"],
                "attn_norm": s[p + "input_layernorm.weight"], "mlp_norm": s[p + "post_attention_layernorm.weight"]}
    if family == "gpt2":
        p, d = f"transformer.h.{i}.", cfg.n_embd
        w, b = s[p + "attn.c_attn.weight"], s[p + "attn.c_attn.bias"]
        return {"q": w[:, :d].t(), "k": w[:, d:2 * d].t(), "v": w[:, 2 * d:].t(),
                "q_bias": b[:d], "k_bias": b[d:2 * d], "v_bias": b[2 * d:],
                "o": s[p + "attn.c_proj.weight"].t(), "o_bias": s[p + "attn.c_proj.bias"],
                "up": s[p + "mlp.c_fc.weight"].t(), "up_bias": s[p + "mlp.c_fc.bias"],
                "down": s[p + "mlp.c_proj.weight"].t(), "down_bias": s[p + "mlp.c_proj.bias"],
                "attn_norm": s[p + "ln_1.weight"], "mlp_norm": s[p + "ln_2.weight"]}
    if family == "gpt_neo":
        p, a = f"transformer.h.{i}.", f"transformer.h.{i}.attn.attention."
        return {"q": s[a + "q_proj.weight"], "k": s[a + "k_proj.weight"], "v": s[a + "v_proj.weight"],
                "o": s[a + "out_proj.weight"], "o_bias": s[a + "out_proj.bias"],
                "up": s[p + "mlp.c_fc.weight"], "up_bias": s[p + "mlp.c_fc.bias"],
                "down": s[p + "mlp.c_proj.weight"], "down_bias": s[p + "mlp.c_proj.bias"],
                "attn_norm": s[p + "ln_1.weight"], "mlp_norm": s[p + "ln_2.weight"]}
    if family == "gpt_neox":
        p, h, d = f"gpt_neox.layers.{i}.", cfg.num_attention_heads, cfg.hidden_size
        w = s[p + "attention.query_key_value.weight"].view(h, 3, d // h, d)
        b = s[p + "attention.query_key_value.bias"].view(h, 3, d // h)
        r = {n: w[:, j].reshape(d, d) for j, n in enumerate("qkv")}
        r.update({f"{n}_bias": b[:, j].reshape(d) for j, n in enumerate("qkv")})
        r.update({"o": s[p + "attention.dense.weight"], "o_bias": s[p + "attention.dense.bias"],
                  "up": s[p + "mlp.dense_h_to_4h.weight"], "up_bias": s[p + "mlp.dense_h_to_4h.bias"],
                  "down": s[p + "mlp.dense_4h_to_h.weight"], "down_bias": s[p + "mlp.dense_4h_to_h.bias"],
                  "attn_norm": s[p + "input_layernorm.weight"], "mlp_norm": s[p + "post_attention_layernorm.weight"]})
        return r
    if family == "gptj":
        p = f"transformer.h.{i}."
        return {"q": s[p + "attn.q_proj.weight"], "k": s[p + "attn.k_proj.weight"], "v": s[p + "attn.v_proj.weight"],
                "o": s[p + "attn.out_proj.weight"], "up": s[p + "mlp.fc_in.weight"],
                "up_bias": s[p + "mlp.fc_in.bias"], "down": s[p + "mlp.fc_out.weight"],
                "down_bias": s[p + "mlp.fc_out.bias"],
                "attn_norm": s[p + "ln_1.weight"], "mlp_norm": s[p + "ln_1.weight"]}  # one norm fills both
    raise KeyError(family)


GLOBALS = {"llama": ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"),
           "gpt2": ("transformer.wte.weight", None, "transformer.ln_f.weight"),
           "gpt_neo": ("transformer.wte.weight", None, "transformer.ln_f.weight"),
           "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight", "gpt_neox.final_layer_norm.weight"),
           "gptj": ("transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight")}

# docs/conversion.md "The mapping tables", restated: target suffix -> role (extended adds the block's own projections).
DEFAULT = {"norm1.weight": "attn_norm", "norm2.weight": "mlp_norm",
           "multi_mem_attention.W_q.weight": "q", "multi_mem_attention.W_q.bias": "q_bias",
           "multi_mem_attention.W_o.weight": "o", "multi_mem_attention.W_o.bias": "o_bias",
           "ffn.0.weight": "up", "ffn.0.bias": "up_bias", "ffn.3.weight": "down", "ffn.3.bias": "down_bias",
           "ffn_gate.weight": "gate", "ffn_gate.bias": "gate_bias"}
EXTENDED = {**DEFAULT, "W_q.weight": "q", "W_q.bias": "q_bias", "W_k.weight": "k", "W_k.bias": "k_bias",
            "W_v.weight": "v", "W_v.bias": "v_bias", "W_z.weight": "v", "W_z.bias": "v_bias"}


def expected(family, state, cfg, table):
    g = GLOBALS.get(family, GLOBALS["llama"])
    out = {"embedding.weight": state[g[0]], "norm.weight": state[g[2]]}
    if family == "gemma":
        out["norm.weight"] = out["norm.weight"] + 1
    head = g[1] if g[1] in state else ("lm_head.weight" if "lm_head.weight" in state else None)
    if head and not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state[head]
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or cfg.num_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    for i in range(2):
        roles = source_roles(family, state, cfg, i)
        for suffix, role in table.items():
            if role in roles:
                t = roles[role]
                if role in ("k", "v", "k_bias", "v_bias") and suffix.startswith("W_") and kv < heads:
                    t = _repeat_kv(t, kv, heads)
                out[f"blocks.{i}.{suffix}"] = t
    return out


@pytest.mark.parametrize("mapping", ["default", "extended"])
@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_every_transferred_tensor_matches_a_hand_conversion(family, mapping, family_models):
    model = family_models[family]
    catalog = open_source(model.path)
    plan = build_plan(catalog, analyze(catalog), mapping=mapping, init="guide")  # the mapping alone
    state = fixtures.load_safetensors_dir(model.path)
    want = expected(family, state, model.config, EXTENDED if mapping == "extended" else DEFAULT)
    got = {tp.name: tp for tp in plan.tensors if tp.kind != "init"}
    assert sorted(got) == sorted(want), family
    for name, tp in got.items():
        out = materialize_rows(tp, catalog, 0, tp.shape[0], plan.seed)
        assert out.dtype == torch.float32 and tuple(out.shape) == tuple(want[name].shape), name
        assert torch.equal(out, want[name].float()), name
        half = tp.shape[0] // 2 + 1  # two awkward row blocks give the same bytes
        assert torch.equal(torch.cat([materialize_rows(tp, catalog, 0, half, 0),
                                      materialize_rows(tp, catalog, half, tp.shape[0], 0)]), out), name
    # every source tensor is used or listed as dropped, never silently lost
    used = {s for tp in plan.tensors for s in tp.sources}
    assert used | set(plan.dropped) == set(catalog.tensors) and not used & set(plan.dropped)


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_self_attend_init_is_ten_times_o_proj_times_v_proj(family, family_models):
    """--init self-attend (the default): W_v = 10 · o · v (k/v heads repeated), the other residual paths
    of the new mixer start at zero (the memory attention's W_o too, even where the mapping copies o_proj),
    and every other mapped tensor is as the `guide` init mode leaves it."""
    model = family_models[family]
    catalog = open_source(model.path)
    guide = build_plan(catalog, analyze(catalog), init="guide")
    plan = build_plan(catalog, analyze(catalog))
    assert plan.options["init"] == "self-attend"
    state = fixtures.load_safetensors_dir(model.path)
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or cfg.num_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    for i in range(2):
        roles = source_roles(family, state, cfg, i)
        v = _repeat_kv(roles["v"], kv, heads) if kv < heads else roles["v"]
        want = 10.0 * roles["o"].double() @ v.double()
        tp = plan.tensor(f"blocks.{i}.W_v.weight")
        assert tp.kind == "transform" and len(tp.sources) == 2, family
        out = materialize_rows(tp, catalog, 0, tp.shape[0], plan.seed)
        torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
        for split in (1, 63, 65):  # any row split gives the same bytes (fixed 64-row product blocks)
            parts = [materialize_rows(tp, catalog, a, min(tp.shape[0], a + split), 0)
                     for a in range(0, tp.shape[0], split)]
            assert torch.equal(torch.cat(parts), out), (family, split)
        for suffix in ("W_z.weight", "W_z.bias", "W_v.bias", "multi_mem_attention.W_o.weight",
                       "multi_mem_attention.W_o.bias"):
            assert plan.tensor(f"blocks.{i}.{suffix}").init == "zeros"
    for old, new in zip(guide.tensors, plan.tensors):
        if old.kind != "init" and "multi_mem_attention.W_o" not in old.name:
            assert old == new, old.name  # otherwise the mapping decides what is copied


def test_family_specifics(family_models):
    def plan_of(f, **kw):
        c = open_source(family_models[f].path)
        return build_plan(c, analyze(c), **kw)

    gpt2 = plan_of("gpt2")
    assert "wpe.weight" in gpt2.dropped and "h.0.ln_1.bias" in gpt2.dropped
    assert gpt2.target_config["ffn_act"] == "gelu_tanh" and not gpt2.target_config["ffn_gated"]
    assert gpt2.tensor("blocks.0.norm1.weight").score == 0.5
    llama = plan_of("llama")
    cfg = llama.target_config
    assert cfg["ffn_gated"] and cfg["ffn_act"] == "silu" and cfg["tie_word_embeddings"] is False
    assert cfg["ffn_dim"] == 128 and "blocks.0.ffn_gate.weight" in [t.name for t in llama.tensors]
    assert plan_of("gemma").tensor("blocks.0.norm1.weight").score == 0.8
    assert plan_of("gemma").target_config["ffn_act"] == "gelu_tanh"
    assert "lm_head.bias" in plan_of("gptj").dropped
    assert plan_of("gpt_neox").target_config["ffn_act"] == "gelu"
