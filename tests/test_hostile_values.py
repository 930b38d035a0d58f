"""Hostile values through the real CLI (RELIABILITY.md, hostile-input classes 2-4): impossible option values
are refused (exit 2, one line naming the option, nothing written), non-finite weights are never saved, names
from a file are escaped before they reach the terminal, wrongly typed files give one line naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmrec.cli.app import app

runner = CliRunner()


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def converted(family_checkpoints, tmp_path_factory) -> Path:
    from mmrec.streaming.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("hv") / "converted"
    convert(ConvertOptions(source=family_checkpoints["llama"], output=out, quiet=True))
    (out / "tokenizer.json").unlink()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hvdata") / "train.txt"
    path.write_text("The river runs past the old mill and into the lake. " * 40)
    return path


FINETUNE_BAD_FLOATS = [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--lr", "0"), ("--lr", "-1"),
    ("--weight-decay", "nan"), ("--weight-decay", "inf"), ("--weight-decay", "-0.1"),
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--grad-clip", "-1"),
    ("--min-lr-ratio", "nan"), ("--min-lr-ratio", "1.5"), ("--dropout", "nan"), ("--dropout", "1"),
]


@pytest.mark.parametrize("option,value", FINETUNE_BAD_FLOATS)
def test_finetune_refuses_impossible_float_options(converted, data, tmp_path, option, value):
    out = tmp_path / "out"
    result = runner.invoke(app, ["finetune", "--checkpoint", str(converted), "--data", str(data),
                                 "--num-steps", "1", "--output", str(out), "--device", "cpu", "--quiet",
                                 option, value])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert option in line
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("--lr", "nan"), ("--lr", "inf"), ("--e2e-lr", "nan"),
                                          ("--e2e-lr", "-1")])
def test_distill_refuses_impossible_float_options(converted, family_checkpoints, data, tmp_path, option, value):
    out = tmp_path / "out"
    result = runner.invoke(app, ["distill", "--teacher", str(family_checkpoints["llama"]), "--student",
                                 str(converted), "--data", str(data), "--output", str(out), "--device", "cpu",
                                 "--quiet", option, value])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert option in line
    assert not out.exists()


def test_non_finite_weights_are_never_saved(converted, tmp_path):
    import torch

    from mmrec import MMRecModel
    from mmrec.training.outputs import NonFiniteWeights, save_train_state, write_model

    model = MMRecModel.from_pretrained(converted)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="non-finite"):
        write_model(model, tmp_path / "model", "2GB")
    with pytest.raises(NonFiniteWeights, match="non-finite"):
        save_train_state(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), None, {}, "2GB")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layer_map", ["0,1.5", "[0, 1.5]", "[0, true]", "[0, 1e400]", "[0, \"x\"]", "0,-1",
                                       "{\"a\": 1}"])
def test_a_fractional_or_odd_layer_index_is_refused(family_checkpoints, tmp_path, layer_map):
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard-convert", "--source", str(family_checkpoints["llama"]), "--output",
                                 str(out), "--layer-map", layer_map, "--quiet"])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "--layer-map" in line
    assert not out.exists()


def test_a_fractional_layer_index_in_a_list_is_refused():
    from mmrec.streaming.plan.layers import build_layer_map
    from mmrec.streaming.plan.model import PlanError

    for bad in ([0, 1.5], [0, True], [0, float("inf")], [0, "1.5"]):
        with pytest.raises(PlanError, match="not a layer number"):
            build_layer_map(bad, 4, 2)
    assert build_layer_map([0, "new"], 4, 2) == [0, None]


EVIL = "evil\x1b]0;pwned\x07\x1b[2J\nerror: fake line\x00\u202e"


@pytest.fixture(scope="module")
def evil_source(family_checkpoints, tmp_path_factory) -> Path:
    """The tiny llama as one model.safetensors plus a tensor whose name holds escape sequences, NUL, a
    newline and a bidi override (it maps to nothing: dropped), and a config string that looks like markup."""
    import torch
    from safetensors.torch import save_file

    from fixtures import load_safetensors_dir

    src = family_checkpoints["llama"]
    out = tmp_path_factory.mktemp("evil") / "src"
    out.mkdir()
    state = {k: v.contiguous() for k, v in load_safetensors_dir(src).items()}
    state[EVIL] = torch.zeros(2)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = config["model_type"]
    config["_name_or_path"] = "[bold red]fake[/bold red]"
    (out / "config.json").write_text(json.dumps(config))
    return out


def assert_inert(text: str) -> None:
    assert "\x1b" not in text and "\x00" not in text and "\x07" not in text and "\u202e" not in text
    assert "\nerror: fake line" not in text


def test_a_dropped_tensor_name_is_escaped_in_the_summary(evil_source, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard-convert", "--source", str(evil_source), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)
    assert "\\x1b]0;pwned\\x07" in result.stdout
    result = runner.invoke(app, ["plan", str(evil_source)])
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)


def test_strict_error_and_inspect_are_escaped(evil_source, tmp_path):
    result = runner.invoke(app, ["inspect", str(evil_source)])
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)


def test_an_error_line_from_a_file_name_is_escaped(tmp_path):
    from mmrec.cli.errors import fail

    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        fail(f"{EVIL}: bad", 1)
    assert err.getvalue().count("\n") == 1
    assert_inert(err.getvalue())


def test_markup_in_a_config_string_is_not_interpreted(family_checkpoints, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(family_checkpoints["llama"], src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "[bold red]llama[/bold red]"
    (src / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["inspect", str(src)])
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert result.exit_code in (0, 1), result.output
    assert "[bold red]llama[/bold red]" in (result.stdout if result.exit_code == 0 else result.stderr)


def _finetune(checkpoint, data, out, *extra):
    return runner.invoke(app, ["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--num-steps", "1",
                               "--output", str(out), "--device", "cpu", "--quiet", "--batch-size", "2",
                               "--seq-len", "8", *extra])


@pytest.mark.parametrize("name,line,fragment", [
    ("deep", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("deep-object", '{"text": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ("huge-int", '{"text": "a", "n": ' + "9" * 5000 + "}", "digits"),
    ("text-not-string", '{"text": {"a": 1}}', "must be a string"),
])
def test_hostile_finetune_data_lines(converted, data, tmp_path, name, line, fragment):
    bad = tmp_path / f"{name}.jsonl"
    bad.write_text('{"text": "fine"}\n' + line + "\n")
    out = tmp_path / "out"
    result = _finetune(converted, bad, out)
    assert result.exit_code == 1, result.output
    err = one_error_line(result)
    assert f"{bad}:2:" in err and fragment in err
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


@pytest.mark.parametrize("field,value,fragment", [
    ("num_heads", "x", "'num_heads' must be a positive integer"),
    ("num_heads", 0, "'num_heads' must be a positive integer"),
    ("model_dim", [64], "'model_dim' must be a positive integer"),
    ("num_layers", True, "'num_layers' must be a positive integer"),
    ("norm_eps", float("nan"), "'norm_eps' must be a finite number"),
    ("norm_eps", float("inf"), "'norm_eps' must be a finite number"),
    ("norm_eps", "x", "'norm_eps' must be a finite number"),
    ("dropout", float("nan"), "'dropout' must be in [0, 1)"),
    ("hds_levels", 10 ** 6, "'hds_levels' must be at most"),
    ("memory_slots", 10 ** 300, "over the limit"),
    ("ffn_act", ["gelu"], "'ffn_act' must be one of"),
    ("torch_dtype", 3, "'torch_dtype' must be a string"),
])
def test_wrong_types_in_an_mmrec_config_are_one_line(converted, data, tmp_path, field, value, fragment):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = _finetune(ckpt, data, out)
    assert result.exit_code == 1, result.output
    err = one_error_line(result)
    assert "config.json" in err and fragment in err, err
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("text", ['{"num_heads": ' + "9" * 5000 + "}", "[" * 100000 + "]" * 100000])
def test_unparseable_mmrec_config_names_the_file(converted, data, tmp_path, text):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    (ckpt / "config.json").write_text(text)
    result = _finetune(ckpt, data, tmp_path / "out")
    assert result.exit_code == 1, result.output
    err = one_error_line(result)
    assert f"{ckpt / 'config.json'}: invalid JSON" in err


@pytest.fixture(scope="module")
def llama_dir_copy(family_checkpoints, tmp_path_factory):
    """A function that copies the tiny llama checkpoint and rewrites one config.json field."""
    import shutil

    def make(field, value) -> Path:
        src = tmp_path_factory.mktemp("cfg") / "src"
        shutil.copytree(family_checkpoints["llama"], src)
        config = json.loads((src / "config.json").read_text())
        config[field] = value
        (src / "config.json").write_text(json.dumps(config))
        return src
    return make


@pytest.mark.parametrize("field,value", [
    ("num_attention_heads", 0), ("num_attention_heads", "4"), ("num_attention_heads", 2.5),
    ("num_attention_heads", True), ("num_key_value_heads", 0), ("num_key_value_heads", [2]),
    ("hidden_size", int("9" * 300)), ("intermediate_size", -8), ("vocab_size", {"a": 1}),
    ("head_dim", 0), ("num_hidden_layers", 0),
    ("rms_norm_eps", "x"), ("rms_norm_eps", -1.0), ("hidden_act", 3), ("hidden_act", ["silu"]),
    ("tie_word_embeddings", "yes"), ("model_type", ["llama"]), ("model_type", 7),
])
def test_wrong_types_in_a_source_config_are_one_line(llama_dir_copy, tmp_path, field, value):
    src = llama_dir_copy(field, value)
    for command in (["inspect", str(src)], ["plan", str(src)],
                    ["shard-convert", "--source", str(src), "--output", str(tmp_path / "out")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, (command, result.output)
        line = one_error_line(result)
        assert "config.json" in line and field in line, line
        assert len(line) < 400
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sharded_output(family_checkpoints, tmp_path_factory) -> Path:
    from mmrec.streaming.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("hvs") / "converted"
    convert(ConvertOptions(source=family_checkpoints["llama"], output=out, max_shard_size="64KB", quiet=True))
    assert (out / "model.safetensors.index.json").exists()
    return out


def _corrupt_copy(sharded_output, tmp_path, name, text) -> Path:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sharded_output, out)
    (out / name).write_text(text)
    return out


@pytest.mark.parametrize("name,text,fragment", [
    ("model.safetensors.index.json", '{"weight_map": [1, 2]}', "weight_map"),
    ("model.safetensors.index.json", '{"weight_map": {"embedding.weight": 3}}', "weight_map"),
    ("model.safetensors.index.json", "WM", "metadata"),  # replaced below by a valid map + bad metadata
    ("model.safetensors.index.json", "[" * 100000, "JSON"),
    ("conversion_report.json", "{not json", "JSON"),
    ("conversion_report.json", '{"tensors": [1]}', "tensors"),
    ("conversion_report.json", '{"tensors": {"embedding.weight": 5}}', "tensors"),
    ("conversion_report.json", '{"tensors": {}, "checksum_algorithm": 7}', "checksum_algorithm"),
    ("conversion_report.json", '{"tensors": {}, "seed": 1e400}', "seed"),
])
def test_verify_names_the_file_of_a_malformed_index_or_report(sharded_output, tmp_path, name, text, fragment):
    if text == "WM":
        index = json.loads((sharded_output / name).read_text())
        text = json.dumps({"weight_map": index["weight_map"], "metadata": [1]})
    out = _corrupt_copy(sharded_output, tmp_path, name, text)
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert any(name in line and fragment in line for line in result.output.splitlines()), result.output


def test_verify_source_refuses_a_report_recipe_it_cannot_read(sharded_output, family_checkpoints, tmp_path):
    report = json.loads((sharded_output / "conversion_report.json").read_text())
    name = next(n for n, e in report["tensors"].items() if e.get("kind") != "init")
    report["tensors"][name]["shape"] = "huge"
    out = _corrupt_copy(sharded_output, tmp_path, "conversion_report.json", json.dumps(report))
    result = runner.invoke(app, ["verify", str(out), "--source", str(family_checkpoints["llama"])])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert name in result.output


def test_verify_against_another_source_lists_problems_not_an_internal_error(sharded_output, family_checkpoints):
    """A wrong --source (another family: other tensor names, other shapes) is a list of problems naming it."""
    result = runner.invoke(app, ["verify", str(sharded_output), "--source", str(family_checkpoints["gpt2"])])
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert "cannot recompute" in result.output or "has no tensor" in result.output, result.output


@pytest.mark.parametrize("op,fragment", [
    ({"op": "slice_rows", "start": "0", "stop": 10}, "start must be a whole number"),
    ({"op": "take_heads", "num_heads": 2, "parts": 2, "part": 5}, "part 5 is not one of the 2 parts"),
    ({"op": "pad_rows", "rows": -1}, "rows must be at least 0"),
    ({"op": "add", "value": 1e400}, "value must be a finite number"),
    ({"op": "cast", "dtype": "F12"}, "unknown dtype"),
])
def test_a_mapping_file_op_with_an_impossible_field_is_one_line(family_checkpoints, tmp_path, op, fragment):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"mappings": [{"target": "embedding.weight", "role": "embed",
                                                 "transforms": [op]}]}).replace("Infinity", "1e400"))
    result = runner.invoke(app, ["plan", str(family_checkpoints["llama"]), "--mapping-file", str(mapping)])
    assert result.exit_code in (1, 2), result.output
    line = one_error_line(result)
    assert fragment in line and "map.json" in line, line
