"""The README's guide-API example builds the model the conversion needs: real checkpoints written by
transformers, the example's code as the README has it, compared with `mmrec shard-convert` +
MMRecModel.from_pretrained; a model built with the config defaults (the original API's way) is refused in one line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmrec import MMRecModel
from mmrec.cli.app import app
from mmrec.streaming import convert_model_weights
from mmrec.streaming.guide_api import TargetModelError, target_config

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = dict(vocab_size=300, model_dim=64, num_layers=1, num_heads=8, ffn_dim=192)  # != the source's
README_SIZES = dict(vocab_size=32000, model_dim=4096, num_layers=24, num_heads=32, ffn_dim=16384)
INPUT_IDS = torch.tensor([[1, 17, 255, 3, 42, 99, 7, 200], [5, 5, 0, 128, 64, 33, 250, 2]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                           max_position_embeddings=64)
    out = tmp_path_factory.mktemp("llama") / "tiny-llama"
    T.LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    out = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    T.GPT2LMHeadModel(config).save_pretrained(out)
    return out


def readme_example(source: Path, output: Path, sizes: dict) -> dict:
    """Run the README's code block as written, with its paths and sizes replaced; returns its names."""
    section = README.read_text().split("## The Python conversion API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    replacements = {'"llama-7b/"': repr(str(source)), '"mmrec-7b/"': repr(str(output))}
    replacements.update({f"{k}={v}": f"{k}={sizes[k]}" for k, v in README_SIZES.items()})
    for old, new in replacements.items():
        assert old in code, f"the README example no longer has {old}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md (guide API example)", "exec"), namespace)
    return namespace


def cli_convert(source: Path, output: Path, sizes: dict) -> MMRecModel:
    flags = [arg for k, v in sizes.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
    result = CliRunner().invoke(app, ["shard-convert", "--source", str(source), "--output", str(output),
                                      *flags, "-q"])
    assert result.exit_code == 0, result.output
    return MMRecModel.from_pretrained(output)


def assert_same_model(model: MMRecModel, expected: MMRecModel) -> None:
    ours, theirs = model.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    model.eval(), expected.eval()
    with torch.no_grad():
        logits, _ = model(INPUT_IDS)
        expected_logits, _ = expected(INPUT_IDS)
    assert torch.equal(logits, expected_logits), (logits - expected_logits).abs().max()


def test_readme_example_gives_from_pretrained_logits(llama, tmp_path):
    ns = readme_example(llama, tmp_path / "mmrec", SIZES)
    model, weights = ns["model"], ns["converted_weights"]
    config = model.config
    assert (config.ffn_act, config.ffn_gated, config.tie_word_embeddings, config.norm_eps) == \
        ("silu", True, False, 1e-5)  # the LLaMA's architecture, not MMRecConfig's defaults
    assert weights.config == config and ns["report"]["target_config"] == config.to_dict()
    assert_same_model(model, cli_convert(llama, tmp_path / "cli", SIZES))


def test_the_guides_default_model_is_refused_before_anything_is_written(llama, tmp_path):
    model = MMRecModel(**SIZES)  # the original API's example: GELU, ungated, tied
    output = tmp_path / "mmrec"
    with pytest.raises(TargetModelError) as caught:
        convert_model_weights(llama, model, output_path=output, strict=False, initialize_new=True)
    message = str(caught.value)
    assert "\n" not in message and str(llama) in message
    for mismatch in ("ffn_act='gelu' vs 'silu'", "ffn_gated=False vs True", "norm_eps=1e-06 vs 1e-05",
                     "tie_word_embeddings=True vs False"):
        assert mismatch in message
    assert "dropout" not in message and not output.exists()
    # The same weights into that model with the README's strict=True fail loudly too.
    weights, _ = convert_model_weights(llama, target_config(llama, **SIZES), output_path=tmp_path / "ok")
    with pytest.raises(RuntimeError, match=r"blocks\.0\.ffn_gate\.weight"):
        model.load_state_dict(weights, strict=True)


@pytest.mark.parametrize("field, value", [("inner_dim", 8), ("memory_segment_len", 64), ("ffn_act", "gelu")])
def test_any_field_the_conversion_sets_is_checked(llama, tmp_path, field, value):
    wrong = dataclasses.replace(target_config(llama, **SIZES), **{field: value})
    with pytest.raises(TargetModelError, match=rf"{field}={value!r} vs "):
        convert_model_weights(llama, MMRecModel.on_meta(wrong), output_path=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_sizes_config_target_and_free_fields(llama, tmp_path):
    weights, report = convert_model_weights(llama, None, output_path=tmp_path / "none")
    expected = cli_convert(llama, tmp_path / "cli", {})
    assert weights.config == expected.config and weights.config.num_layers == 2
    model = MMRecModel(weights.config)
    model.load_state_dict(weights, strict=True)
    assert_same_model(model, expected)
    # A config as target_model, with the dropout and dtype a fine-tuning run may pick, is accepted.
    free = dataclasses.replace(weights.config, dropout=0.0, torch_dtype="bfloat16")
    again, _ = convert_model_weights(llama, free, output_path=tmp_path / "again")
    assert again.config == weights.config
    with pytest.raises(TypeError, match="target_model must be an MMRecModel, an MMRecConfig or None, got dict"):
        convert_model_weights(llama, dict(SIZES))


def test_tied_source_loads_strictly_with_the_readme_example(gpt2, tmp_path):
    ns = readme_example(gpt2, tmp_path / "mmrec", SIZES)
    model, weights = ns["model"], ns["converted_weights"]
    assert model.config.tie_word_embeddings and model.config.ffn_act == "gelu_tanh"
    assert "lm_head.weight" in weights and len(weights) == len(list(weights))
    assert model.lm_head.weight is model.embedding.weight  # still tied after the strict load
    assert_same_model(model, cli_convert(gpt2, tmp_path / "cli", SIZES))
