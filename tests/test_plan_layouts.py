"""One llama in every layout (safetensors, .bin shards, Meta consolidated, wrapped .pt, bf16) plans and
materializes identically: Meta's rotary order is brought to the HF order."""

from __future__ import annotations

import pytest
import torch

from mmrec.streaming.analysis import analyze
from mmrec.streaming.plan import build_plan
from mmrec.streaming.sources import open_source
from mmrec.streaming.transforms import materialize_rows


def _plan(path, **kw):
    catalog = open_source(path)
    return catalog, build_plan(catalog, analyze(catalog), mapping="extended", **kw)


def _recipe(plan):
    """What a tensor is made of, in layout-independent terms."""
    return [(tp.name, tp.dtype, tp.shape, tp.kind, tp.score, tp.init) for tp in plan.tensors]


def _materialize(catalog, plan):
    return {tp.name: materialize_rows(tp, catalog, 0, tp.shape[0], plan.seed) for tp in plan.tensors}


@pytest.mark.parametrize("layout", ["bin", "pt", "single_file", "meta", "meta_vocab_parallel"])
def test_layouts_give_identical_plans_and_bytes(layout, llama_layouts):
    ref_cat, ref = _plan(llama_layouts["safetensors"])
    cat, plan = _plan(llama_layouts[layout])
    assert plan.target_config == ref.target_config
    assert plan.layer_map == ref.layer_map
    if layout.startswith("meta"):  # other names, same kinds/scores except the permute (layout only)
        assert [r[:3] + r[4:] for r in _recipe(plan)] == [r[:3] + r[4:] for r in _recipe(ref)]
        wq = plan.tensor("blocks.0.multi_mem_attention.W_q.weight")
        assert wq.transforms[0]["op"] == "rotary_meta_to_hf" and wq.score == 1.0
    else:  # same names after prefix normalisation: the very same recipes
        assert [tp.to_dict() for tp in plan.tensors] == [tp.to_dict() for tp in ref.tensors]
        assert plan.dropped == ref.dropped
    got, want = _materialize(cat, plan), _materialize(ref_cat, ref)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_bf16_source_and_dtype_option(llama_layouts):
    cat16, p16 = _plan(llama_layouts["bf16"])
    assert p16.target_config["torch_dtype"] == "bfloat16"
    assert all(tp.dtype == "BF16" for tp in p16.tensors)
    assert p16.tensor("embedding.weight").kind == "copy"
    cat, p32 = _plan(llama_layouts["safetensors"], dtype="bf16")
    emb = p32.tensor("embedding.weight")
    assert emb.transforms == [{"op": "cast", "dtype": "BF16"}] and emb.score == 1.0
    assert torch.equal(materialize_rows(emb, cat, 0, emb.shape[0], 0),
                       materialize_rows(p16.tensor("embedding.weight"), cat16, 0, emb.shape[0], 0))
