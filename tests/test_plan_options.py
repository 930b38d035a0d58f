"""Plan options: sizes, layer maps, strict / initialize_new, mapping files, a custom converter, errors,
JSON round trip, the report and the `plan` command."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from mmrec.schema import parameter_specs
from mmrec.config import MMRecConfig
from mmrec.streaming.analysis import analyze
from mmrec.streaming.plan import ConversionPlan, ModelWeightConverter, PlanError, build_plan
from mmrec.streaming.plan.layers import build_layer_map
from mmrec.streaming.report import build_report, summary_text
from mmrec.streaming.sources import open_source
from mmrec.streaming.transforms import materialize_rows


@pytest.fixture(scope="module")
def llama(family_checkpoints):
    catalog = open_source(family_checkpoints["llama"])
    return catalog, analyze(catalog)


def test_layer_maps():
    assert build_layer_map("first", 4, 2) == [0, 1]
    assert build_layer_map("first", 2, 4) == [0, 1, None, None]
    assert build_layer_map("uniform", 32, 24)[0] == 0 and build_layer_map("uniform", 32, 24)[-1] == 31
    assert build_layer_map("uniform", 5, 3) == [0, 2, 4]
    assert build_layer_map("uniform", 5, 1) == [0]
    assert build_layer_map("3,new,0", 4, 3) == [3, None, 0]
    assert build_layer_map("[1, null]", 2, 2) == [1, None]
    with pytest.raises(PlanError, match="--layer-map lists 2 layers"):
        build_layer_map("0,1", 4, 3)
    with pytest.raises(PlanError, match="source layer 9"):
        build_layer_map("0,9", 4, 2)
    with pytest.raises(PlanError, match="not a layer number"):
        build_layer_map("0,x", 4, 2)


def test_fewer_layers_and_uniform_map(llama):
    plan = build_plan(*llama, {"num_layers": 1}, layer_map="uniform")
    assert plan.layer_map == [0]
    assert "layers.1.mlp.up_proj.weight" in plan.dropped
    plan = build_plan(*llama, {"num_layers": 1}, layer_map="1")
    assert plan.tensor("blocks.0.ffn.0.weight").sources == ["layers.1.mlp.up_proj.weight"]


def test_more_layers_start_new(llama):
    plan = build_plan(*llama, {"num_layers": 3})
    assert plan.layer_map == [0, 1, None]
    assert all(tp.kind == "init" for tp in plan.tensors if tp.name.startswith("blocks.2."))
    assert any("target layers 2" in w for w in plan.warnings)


def test_size_mismatch_makes_tensors_new_except_vocab(llama):
    catalog, analysis = llama
    plan = build_plan(catalog, analysis, {"model_dim": 96, "num_heads": 4})
    assert all(tp.kind == "init" for tp in plan.tensors)
    names = {m["target"] for m in plan.shape_mismatches}
    assert "embedding.weight" in names and "blocks.0.ffn.0.weight" in names
    plan = build_plan(catalog, analysis, {"ffn_dim": 100})
    assert plan.tensor("blocks.0.ffn.0.weight").kind == "init"
    assert plan.tensor("blocks.0.multi_mem_attention.W_q.weight").kind == "copy"
    with pytest.raises(PlanError, match="--num_heads"):
        build_plan(catalog, analysis, {"model_dim": 66})


def test_vocab_truncate_and_pad(llama):
    catalog, analysis = llama
    src = catalog.read("embed_tokens.weight")
    small = build_plan(catalog, analysis, {"vocab_size": 100}).tensor("embedding.weight")
    assert small.score == 0.5 and small.transforms == [{"op": "slice_rows", "start": 0, "stop": 100}]
    assert torch.equal(materialize_rows(small, catalog, 0, 100, 0), src[:100])
    big = build_plan(catalog, analysis, {"vocab_size": 300})
    emb, head = big.tensor("embedding.weight"), big.tensor("lm_head.weight")
    assert emb.score == head.score == 0.5
    out = materialize_rows(emb, catalog, 0, 300, 0)
    assert torch.equal(out[:256], src)
    assert torch.allclose(out[256:], src.double().mean(0).float().expand(44, -1), atol=1e-7, rtol=0)


def test_strict_and_initialize_new(llama):
    with pytest.raises(PlanError, match="--strict: .*blocks.0.W_q.weight"):
        build_plan(*llama, strict=True)
    full = build_plan(*llama)
    partial = build_plan(*llama, initialize_new=False)
    assert [tp.name for tp in partial.tensors] == [tp.name for tp in full.tensors if tp.kind != "init"]
    report = build_report(partial)
    assert report["new_keys"] == [] and len(report["missing_keys"]) == report["total_keys"] - report["converted_keys"]
    assert report["transferred_parameter_share"] == build_report(full)["transferred_parameter_share"]


def test_plan_is_json_round_trip_and_deterministic(llama):
    plan = build_plan(*llama, mapping="extended", seed=5)
    again = ConversionPlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert build_plan(*llama, mapping="extended", seed=5).to_json() == plan.to_json()
    specs = parameter_specs(MMRecConfig.from_dict(plan.target_config))
    assert [tp.name for tp in plan.tensors] == [s.name for s in specs]
    assert plan.options["seed"] == 5 and plan.options["mapping"] == "extended"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_mapping_file(llama, tmp_path, suffix):
    entries = [{"target": "blocks.{i}.W_g.weight", "source": "layers.{i}.self_attn.o_proj.weight",
                "transforms": [{"op": "transpose"}]},
               {"target": "blocks.{i}.W_z.weight", "role": "q"},
               {"target": "blocks.1.norm1.weight", "source": None}]
    path = tmp_path / f"map{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"base": "default", "mappings": entries}))
    else:
        import yaml

        path.write_text(yaml.safe_dump({"mappings": entries}))
    catalog, analysis = llama
    plan = build_plan(catalog, analysis, mapping_file=path)
    wg = plan.tensor("blocks.1.W_g.weight")
    assert wg.sources == ["layers.1.self_attn.o_proj.weight"] and wg.score == 0.8
    assert torch.equal(materialize_rows(wg, catalog, 0, 64, 0), catalog.read(wg.sources[0]).t())
    assert plan.tensor("blocks.0.W_z.weight").sources == ["layers.0.self_attn.q_proj.weight"]
    assert plan.tensor("blocks.1.norm1.weight").kind == "init"
    assert plan.tensor("blocks.0.norm1.weight").kind == "copy"
    assert plan.options["mapping_file_sha256"]


def test_bad_mapping_files(llama, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(PlanError, match="--mapping-file .*not valid JSON"):
        build_plan(*llama, mapping_file=bad)
    bad.write_text(json.dumps([{"target": "norm.weight", "source": "norm.weight",
                                "transforms": [{"op": "explode"}]}]))
    with pytest.raises(PlanError, match="unknown transform op 'explode'"):
        build_plan(*llama, mapping_file=bad)
    bad.write_text(json.dumps([{"target": "blocks.{i}.W_q.weight", "source": "norm.weight",
                                "transforms": [{"op": "transpose"}]}]))
    with pytest.raises(PlanError, match="blocks.0.W_q.weight <- norm.weight: transpose"):
        build_plan(*llama, mapping_file=bad)


def test_custom_converter_keys_match(llama):
    class EveryLayerFromZero(ModelWeightConverter):
        def _keys_match(self, source_pattern, source_key, target_key):
            return source_key == source_pattern.replace("{i}", "0")

    plan = build_plan(*llama, converter=EveryLayerFromZero())
    assert plan.tensor("blocks.1.ffn.0.weight").sources == ["layers.0.mlp.up_proj.weight"]
    assert plan.options["converter"].endswith("EveryLayerFromZero")
    assert ModelWeightConverter("extended").plan(*llama).tensor("blocks.0.W_k.weight").kind == "transform"


def test_unknown_family_and_bad_options(llama, tmp_path):
    catalog, analysis = llama
    alien = {**analysis.to_dict(), "model_type": "bert"}
    with pytest.raises(PlanError, match="unknown model family 'bert'.*--mapping-file"):
        build_plan(catalog, alien)
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"base": "none", "mappings": {"embedding.weight": "embed_tokens.weight"}}))
    plan = build_plan(catalog, alien, mapping_file=path)
    assert [tp.name for tp in plan.tensors if tp.kind != "init"] == ["embedding.weight"]
    with pytest.raises(PlanError, match="--dtype"):
        build_plan(catalog, analysis, dtype="int8")
    with pytest.raises(PlanError, match="--dtype"):
        build_plan(catalog, analysis, dtype="float12")
    with pytest.raises(PlanError, match="--mapping"):
        build_plan(catalog, analysis, mapping="fancy")
    with pytest.raises(PlanError, match="model_dim"):
        build_plan(catalog, analysis, {"model_dim": 0})


def test_report_is_consistent(family_checkpoints):
    for family, path in family_checkpoints.items():
        catalog = open_source(path)
        plan = build_plan(catalog, analyze(catalog))
        r = build_report(plan, checksums={"embedding.weight": "abc"}, timings={"total_s": 1.5})
        for key in ("total_keys", "converted_keys", "missing_keys", "new_keys", "shape_mismatches",
                    "source_analysis", "compatibility_scores", "transferred_parameter_share", "dropped",
                    "layer_map", "tensors", "timings", "warnings"):
            assert key in r, key
        assert r["converted_keys"] + len(r["missing_keys"]) == r["total_keys"] == len(r["compatibility_scores"])
        assert set(r["new_keys"]) <= set(r["missing_keys"])
        assert set(r["compatibility_scores"].values()) <= {1.0, 0.8, 0.5, 0.0}
        assert all(r["compatibility_scores"][k] == 0.0 for k in r["missing_keys"])
        moved = sum(torch.Size(t["shape"]).numel() for t in r["tensors"].values() if t["kind"] != "init")
        assert r["transferred_parameters"] == moved
        assert 0 < r["transferred_parameter_share"] == moved / r["total_parameters"] < 1
        assert r["tensors"]["embedding.weight"]["checksum"] == "abc"
        json.dumps(r)
        text = summary_text(r)
        assert f"{r['transferred_parameter_share']:.1%}" in text and family in text


def _app():
    from mmrec.cli.plan_cmd import plan

    app = typer.Typer()
    app.command("plan")(plan)
    app.callback()(lambda: None)
    return app


def test_plan_command(family_checkpoints):
    runner, src = CliRunner(), str(family_checkpoints["llama"])
    out = runner.invoke(_app(), ["plan", src, "--num-layers", "1", "--vocab_size", "300", "--mapping", "extended"])
    assert out.exit_code == 0, out.output
    assert "parameters transferred" in out.output and "vocabulary 256 -> 300" in out.output
    out = runner.invoke(_app(), ["plan", src, "--model_dim", "64", "--num_heads", "8", "--json", "--no-initialize-new"])
    assert out.exit_code == 0, out.output
    plan = ConversionPlan.from_json(out.stdout)
    assert plan.target_config["num_heads"] == 8 and not any(tp.kind == "init" for tp in plan.tensors)
    out = runner.invoke(_app(), ["plan", src, "--strict"])
    assert out.exit_code == 1 and "error: --strict" in out.stderr
    out = runner.invoke(_app(), ["plan", src + "/missing"])
    assert out.exit_code == 1 and out.stderr.startswith("error: ")
