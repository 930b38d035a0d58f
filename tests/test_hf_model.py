"""mmrec.hf: a real `mmrec shard-convert` output loaded and run through transformers' Auto classes.

`converted_checkpoint()` is shared with the other test_hf_* files: a tiny transformers LLaMA (conftest's
family_models) with a real word-level tokenizer, converted once per session by the CLI in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import mmrec  # noqa: E402
import mmrec.hf  # noqa: E402  registers model_type "mmrec"
from mmrec import MMRecConfig as RuntimeConfig  # noqa: E402
from mmrec import MMRecModel  # noqa: E402
from mmrec.checkpoint import LazyStateDict  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

WORDS = "the a cat dog sat on mat ran far and then it was quiet in house".split()
_CONVERTED: dict[str, Path] = {}


def write_word_tokenizer(directory: Path) -> None:
    """A real (tokenizers) word-level tokenizer with <s>/</s>, saved the way transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(directory)


def converted_checkpoint(family_models, tmp_path_factory) -> Path:
    """The tiny llama with a tokenizer, converted by `python -m mmrec shard-convert` (several shards)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _CONVERTED:
        root = tmp_path_factory.mktemp("hf")
        source = root / "llama"
        shutil.copytree(family_models["llama"].path, source)
        write_word_tokenizer(source)
        out = root / "converted"
        # --init guide: Xavier values for what the source cannot fill. The default init starts W_z at zero,
        # so a fresh conversion's outputs do not yet depend on the prefix, and state bugs would not show.
        subprocess.run([sys.executable, "-m", "mmrec", "shard-convert", "--source", str(source), "--output",
                        str(out), "--max-shard-size", "60KB", "--init", "guide", "-q"],
                       check=True, capture_output=True)
        _CONVERTED[key] = out
    return _CONVERTED[key]


@pytest.fixture(scope="module")
def converted(family_models, tmp_path_factory) -> Path:
    return converted_checkpoint(family_models, tmp_path_factory)


@pytest.fixture(scope="module")
def short_segment(converted, tmp_path_factory) -> Path:
    """The converted files with memory_segment_len 4, so generation crosses several memory writes."""
    out = tmp_path_factory.mktemp("segment4") / "converted"
    shutil.copytree(converted, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "memory_segment_len": 4}))
    return out


def count_runtime_calls(model) -> tuple[list[int], object]:
    """Input lengths of every call of the wrapped runtime MMRecModel (a forward pre-hook; the real model)."""
    lengths: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[-1]))
    return lengths, handle


def test_converter_config_names_the_transformers_class(converted):
    data = json.loads((converted / "config.json").read_text())
    assert data["architectures"] == ["MMRecForCausalLM"] and data["model_type"] == "mmrec"
    assert data["torch_dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in converted.iterdir()}


def test_runtime_config_without_architectures_still_loads_and_gains_it(tmp_path):
    old = {"model_type": "mmrec", "vocab_size": 10, "model_dim": 8, "num_heads": 2, "memory_slots": 16}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = RuntimeConfig.load(tmp_path)
    assert config == RuntimeConfig(vocab_size=10, model_dim=8, num_heads=2, memory_slots=16)
    assert config.to_dict()["architectures"] == ["MMRecForCausalLM"]
    assert RuntimeConfig.from_dict(config.to_dict()) == config  # the default is not carried as an extra


def test_auto_classes_load_the_converted_directory_unchanged(converted):
    before = {p.name: p.read_bytes() for p in converted.iterdir()}
    config = AutoConfig.from_pretrained(converted)
    assert isinstance(config, mmrec.hf.MMRecConfig)
    assert config.to_runtime() == RuntimeConfig.load(converted)
    assert (config.hidden_size, config.num_hidden_layers) == (config.model_dim, config.num_layers)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert isinstance(model, mmrec.hf.MMRecForCausalLM) and isinstance(model.model, MMRecModel)
    assert not model.training
    stored = LazyStateDict(converted)
    params = dict(model.model.named_parameters())
    assert set(params) == set(stored)  # the converter's tensor names, every one loaded
    assert all(torch.equal(params[name], stored[name]) for name in stored)
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before


def test_the_converted_model_depends_on_its_prefix(converted):
    """What the generate tests rely on: a wrong state would change the next token's logits."""
    runtime = MMRecModel.from_pretrained(converted)
    with torch.no_grad():
        a = runtime(torch.tensor([[1, 3, 5, 7, 9]]))[0][0, -1]
        b = runtime(torch.tensor([[1, 4, 6, 8, 9]]))[0][0, -1]
    assert (a - b).abs().max() > 1e-2


def test_forward_is_the_runtime_forward(converted):
    model = AutoModelForCausalLM.from_pretrained(converted)
    runtime = MMRecModel.from_pretrained(converted)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    expected, _ = runtime(ids)
    assert torch.equal(out.logits, expected.float())
    shifted = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(shifted.item(), rel=1e-6)
    # Feeding the same tokens in two calls with the returned cache gives the same logits.
    first = model(input_ids=ids[:, :4])
    second = model(input_ids=ids[:, 4:], cache=first.cache)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), out.logits, atol=1e-5)
    assert second.cache.get_seq_length() == 9


def test_fresh_model_from_a_runtime_config():
    runtime_config = RuntimeConfig(vocab_size=50, model_dim=32, num_layers=1, num_heads=4, memory_slots=16,
                                   dropout=0.0)
    config = mmrec.hf.MMRecConfig.from_runtime(runtime_config)
    assert config.to_runtime() == runtime_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    expected = MMRecModel(runtime_config)  # the same modules, built in the same order: the same init
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(input_ids=ids).logits, expected(ids)[0])
    with pytest.raises(mmrec.ConfigError, match="num_heads"):
        mmrec.hf.MMRecConfig(vocab_size=50, model_dim=32, num_heads=5)


def test_tokenizer_loads_from_the_converted_directory(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer("the cat sat on the mat", add_special_tokens=False).input_ids == [3, 5, 7, 8, 3, 9]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


@pytest.mark.parametrize("which", ["converted", "short_segment"])
def test_greedy_generate_matches_runtime_one_step_per_token(which, request):
    directory = request.getfixturevalue(which)
    model = AutoModelForCausalLM.from_pretrained(directory)
    runtime = MMRecModel.from_pretrained(directory)
    prompts = torch.tensor([[1, 3, 5, 7, 8, 3, 9], [1, 4, 6, 10, 11, 12, 13]])
    lengths, handle = count_runtime_calls(model)
    try:
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        handle.remove()
    expected = runtime.generate(prompts, 12)
    assert torch.equal(out, expected)
    assert len(set(out[0, 7:].tolist())) > 1  # a real continuation, not one token repeated
    # The prompt runs once; then one single-token step per new token (the last token needs no step).
    assert lengths == [7] + [1] * 11


def test_generate_continues_from_a_returned_cache(converted):
    model = AutoModelForCausalLM.from_pretrained(converted)
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    first = model.generate(torch.tensor([[1, 3, 5, 7]]), max_new_tokens=4, return_dict_in_generate=True, **options)
    assert first.cache.get_seq_length() == 7  # the last new token has not been fed yet
    lengths, handle = count_runtime_calls(model)
    try:
        more = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, **options)
    finally:
        handle.remove()
    assert lengths == [1, 1, 1, 1]  # only the unfed token, then one per new token: no prefix re-run
    assert torch.equal(more, MMRecModel.from_pretrained(converted).generate(torch.tensor([[1, 3, 5, 7]]), 8))


def test_beam_search_reorders_the_state(short_segment):
    model = AutoModelForCausalLM.from_pretrained(short_segment)
    prompt = torch.tensor([[1, 3, 5, 7, 8]])
    out = model.generate(prompt, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False,
                         length_penalty=0.0, eos_token_id=None, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    runtime = MMRecModel.from_pretrained(short_segment)
    with torch.no_grad():
        logp = runtime(out.sequences)[0].float().log_softmax(-1)
    # Each beam's score, summed step by step from the carried (and reordered) state, is its sequence's
    # log-likelihood computed afresh from the tokens alone.
    fresh = logp[:, 4:-1].gather(-1, out.sequences[:, 5:, None]).squeeze(-1).sum(-1)
    assert torch.allclose(out.sequences_scores, fresh, atol=1e-4)
    assert len({tuple(s) for s in out.sequences.tolist()}) == 3


def test_gradient_checkpointing_gives_the_same_gradients(converted):
    ids = torch.tensor([[1, 3, 5, 7, 8, 3, 9, 4]])
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(converted).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.blocks[0].W_v.weight.grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_generate_refuses_left_padding(converted):
    model = AutoModelForCausalLM.from_pretrained(converted)
    prompts = torch.tensor([[0, 0, 3, 5], [1, 3, 5, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="padding"):
        model.generate(prompts, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_dtype_and_device_arguments(converted):
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(converted, torch_dtype="auto").dtype == torch.float32
    with pytest.raises(NotImplementedError, match="several devices"):
        AutoModelForCausalLM.from_pretrained(converted, device_map={"model.blocks.0": "cpu", "model.norm": "meta"})
    with pytest.raises(NotImplementedError, match="quantization_config"):
        mmrec.hf.MMRecForCausalLM.from_pretrained(converted, quantization_config={"bits": 4})
    assert AutoModelForCausalLM.from_pretrained(converted, use_cache=False).config.use_cache is False
    with pytest.raises(ValueError, match="memory_segment_len"):  # model fields come from config.json only
        AutoModelForCausalLM.from_pretrained(converted, memory_segment_len=4)


def test_save_pretrained_writes_the_converter_layout(converted, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(converted)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    model.save_pretrained(tmp_path / "saved", max_shard_size="60KB")
    assert set(LazyStateDict(tmp_path / "saved")) == set(LazyStateDict(converted))
    runtime = MMRecModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(runtime.norm.weight, model.model.norm.weight)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 3, 5, 7]])
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_directories_name_the_missing_file(tmp_path):
    with pytest.raises(OSError, match=r"config\.json"):
        mmrec.hf.MMRecForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="not a directory"):
        mmrec.hf.MMRecForCausalLM.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"config\.json"):  # transformers' own AutoConfig check comes first
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mmrec", "vocab_size": 10, "model_dim": 8,
                                                      "num_heads": 3, "memory_slots": 16}))
    with pytest.raises(mmrec.ConfigError, match=r"config\.json: config field 'num_heads'"):
        mmrec.hf.MMRecForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(mmrec.ConfigError, match="num_heads"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mmrec", "vocab_size": 10, "model_dim": 8,
                                                      "num_heads": 2, "memory_slots": 16}))
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_import_mmrec_and_the_converter_do_not_import_transformers():
    probe = ("import sys, mmrec, mmrec.streaming.convert, mmrec.cli.app\n"
             "from mmrec import MMRecModel\n"
             "print([m for m in ('transformers', 'mmrec.hf', 'peft', 'lm_eval') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_generate_matches_runtime(converted):
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.bfloat16, device_map="auto")
    assert model.device.type == "cuda"
    runtime = MMRecModel.from_pretrained(converted, device="cuda", dtype=torch.bfloat16)
    prompts = torch.tensor([[1, 3, 5, 7, 8, 3, 9]], device="cuda")
    lengths = []  # at the wrapper: one-token steps replay the runtime's CUDA graph, past its forward
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)
    try:
        out = model.generate(prompts, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        handle.remove()
    assert torch.equal(out, runtime.generate(prompts, 16))
    assert lengths == [7] + [1] * 15
