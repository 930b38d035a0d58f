"""`mmrec finetune` and mmrec.training.finetune: a tiny converted LLaMA trained on CPU for a few steps."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmrec import MMRecModel
from mmrec.training.finetune import DataError, FinetuneOptions, FinetuneRefused, finetune, load_tokenizer

MMREC = [sys.executable, "-m", "mmrec"]
SENTENCES = ["The river runs past the old mill and into the lake.",
             "A small boat crossed the lake at dawn, carrying bread to the village.",
             "def add(a, b):\n    return a + b\n",
             "The village baker wakes before the sun and lights the oven."]


@pytest.fixture(scope="module")
def converted(family_checkpoints, tmp_path_factory) -> Path:
    """The tiny llama (vocab 256, hidden 64, 2 layers) converted to MM-Rec; byte-level tokenizer."""
    from mmrec.streaming.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("ft") / "converted"
    convert(ConvertOptions(source=family_checkpoints["llama"], output=out, quiet=True))
    (out / "tokenizer.json").unlink()  # the fixture's stand-in; the byte-level fallback is used
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": " ".join(SENTENCES[i % 4:] + SENTENCES[:i % 4])}) + "\n"
                             for i in range(40)))
    story = root / "story.txt"
    story.write_text("\n".join(SENTENCES * 5))
    held_out = root / "held_out.jsonl"
    held_out.write_text(json.dumps({"text": " ".join(SENTENCES[::-1] * 3)}) + "\n")
    return {"train": train, "story": story, "eval": held_out}


def options(checkpoint, text, output, **overrides) -> FinetuneOptions:
    values = dict(checkpoint=checkpoint, data=[text["train"], text["story"]], num_steps=8, output=output,
                  lr=3e-3, batch_size=4, seq_len=16, device="cpu", max_shard_size="60KB", threads=1)
    values.update(overrides)
    return FinetuneOptions(**values)


def losses(output: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (output / "loss_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def full_run(converted, text, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("full") / "out"
    return out, finetune(options(converted, text, out))


def test_a_few_steps_lower_the_loss(converted, text, tmp_path):
    summary = finetune(options(converted, text, tmp_path / "out", num_steps=12, dropout=0.0,
                               eval_data=[text["eval"]], eval_every=6))
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 4 * 16
    assert summary["tokenizer"] == "bytes"
    assert summary["final_loss"] < summary["initial_loss"] - 0.3
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    log = [json.loads(line) for line in (tmp_path / "out" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 6, 12]


def test_resume_continues_the_same_run(converted, text, full_run, tmp_path):
    out, summary = full_run
    split = tmp_path / "split"
    first = finetune(options(converted, text, split, stop_at=3))  # as if interrupted after step 3
    assert first["steps"] == 3 and not first["finished"]
    with pytest.raises(FinetuneRefused, match="--resume"):
        finetune(options(converted, text, split))
    with pytest.raises(FinetuneRefused, match="lr"):
        finetune(options(converted, text, split, lr=1e-3, resume=True))
    with pytest.raises(FinetuneRefused, match=r"settings changed \(decay_penalty\)"):
        finetune(options(converted, text, split, decay_penalty=0.0, resume=True))
    resumed = finetune(options(converted, text, split, resume=True))
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 8 and resumed["finished"]
    # Dropout is on (the config's 0.1): the RNG, the carried state and the optimizer all come back.
    assert losses(split) == losses(out)
    assert resumed["initial_loss"] == summary["initial_loss"] and resumed["final_loss"] == summary["final_loss"]
    a, b = MMRecModel.from_pretrained(out), MMRecModel.from_pretrained(split)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_the_carried_state_size_is_logged(full_run):
    out, summary = full_run
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    sizes = [r["max_abs_h"] for r in log]
    assert len(sizes) == 8 and all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in sizes)
    assert summary["max_abs_h"] == max(sizes) > 0  # 0 at step 1 only: the conversion starts W_z at 0
    assert summary["settings"]["decay_penalty"] == 10.0
    assert json.loads((out / "finetune_summary.json").read_text())["max_abs_h"] == max(sizes)


def test_a_run_saved_before_decay_penalty_resumes_without_the_guard(converted, text, tmp_path):
    """A train_state without decay_penalty in its settings was trained with no guard: it resumes with
    decay_penalty=0, and the default (a change) is refused."""
    out = tmp_path / "old"
    finetune(options(converted, text, out, num_steps=2, stop_at=1, decay_penalty=0.0))
    trainer_state = out / "train_state" / "trainer_state.json"
    saved = json.loads(trainer_state.read_text())
    del saved["settings"]["decay_penalty"]
    trainer_state.write_text(json.dumps(saved))
    with pytest.raises(FinetuneRefused, match="decay_penalty"):
        finetune(options(converted, text, out, num_steps=2, resume=True))
    resumed = finetune(options(converted, text, out, num_steps=2, resume=True, decay_penalty=0.0))
    assert resumed["steps"] == 2 and resumed["finished"]


def test_the_output_loads_with_from_pretrained(full_run):
    out, summary = full_run
    model = MMRecModel.from_pretrained(out)  # strict
    assert (out / "model.safetensors.index.json").exists()  # sharded (max_shard_size 60KB)
    assert model.num_parameters() == summary["parameters"]
    state = out / "train_state"
    optimizer = torch.load(state / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(list(model.parameters()))
    assert json.loads((state / "trainer_state.json").read_text())["step"] == 8
    trained = MMRecModel.from_pretrained(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained.state_dict()[name]), name
    logits, _ = model(torch.tensor([[72, 105]]))
    assert torch.isfinite(logits).all()
    assert len(losses(out)) == 8
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").stat().st_size > 1000


def test_fresh_init_and_a_tokenizer_json(converted, text, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    checkpoint = tmp_path / "with_tokenizer"
    shutil.copytree(converted, checkpoint)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tokenizer.train_from_iterator(SENTENCES * 10, trainer)
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    loaded = load_tokenizer(checkpoint)
    assert loaded.kind == "tokenizer.json" and loaded.separator == [tokenizer.token_to_id("</s>")]
    runs = [finetune(options(checkpoint, text, tmp_path / f"fresh{i}", fresh=True, num_steps=2, seed=7))
            for i in range(2)]
    assert runs[0]["tokenizer"] == "tokenizer.json"
    assert runs[0]["initial_loss"] == runs[1]["initial_loss"]  # the fresh init is seeded
    assert (tmp_path / "fresh0" / "tokenizer_config.json").exists()  # tokenizer files travel with the model
    converted_run = finetune(options(converted, text, tmp_path / "conv", num_steps=2, seed=7))
    assert converted_run["initial_loss"] != runs[0]["initial_loss"]


@pytest.mark.parametrize("name, content, words", [
    ("missing.jsonl", None, "no such file"),
    ("data.csv", "a,b\n", "unsupported data file type '.csv'"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": broken\n', "bad.jsonl:2: not valid JSON"),
    ("notext.jsonl", '{"text": "fine"}\n{"body": "x"}\n', "notext.jsonl:2: no \"text\" field"),
    ("number.jsonl", '{"text": 5}\n', "number.jsonl:1: \"text\" must be a string"),
    ("empty.txt", "  \n", "empty.txt: empty file"),
    ("latin1.txt", b"caf\xe9\n", "latin1.txt:1: not UTF-8"),
    ("short.txt", "tiny", "too few for one batch"),
])
def test_bad_data_files_are_clear_errors(converted, text, tmp_path, name, content, words):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as raised:
        finetune(options(converted, text, tmp_path / "out", data=[path]))
    assert words in str(raised.value)
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli(converted, text, tmp_path):
    out = tmp_path / "out"
    args = [*MMREC, "finetune", "--checkpoint", str(converted), "--data", str(text["train"]), "--data",
            str(text["story"]), "--num-steps", "3", "--output", str(out), "--batch-size", "2", "--seq-len", "8",
            "--device", "cpu", "--threads", "1", "--json"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"initial_loss", "final_loss", "steps", "tokens"} <= summary.keys()
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 8
    assert "tok/s" in result.stderr  # progress lines
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 3 and "--resume" in again.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    failed = subprocess.run([*MMREC, "finetune", "--checkpoint", str(converted), "--data", str(bad),
                             "--num-steps", "3", "--output", str(tmp_path / "o2")], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [f"error: {bad}:1: no \"text\" field (each line must be an "
                                                  "object like {\"text\": \"...\"})"]
