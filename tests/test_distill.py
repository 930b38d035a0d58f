"""`mmrec distill` and `shard-convert --init`: real transformers checkpoints, real conversions, the real CLI.

CPU only and small: tiny teachers (hidden 64, 2 layers, byte-level vocabulary of 256), a few thousand
calibration tokens of generated English-like text, a few dozen optimizer steps.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fixtures
from mmrec import MMRecModel
from mmrec.streaming.convert import ConvertOptions, convert
from mmrec.streaming.distill.run import REPORT, DistillOptions, distill
from mmrec.training.data import ByteTokenizer, tokenize_documents
from mmrec.training.evaluate import heldout_windows, mmrec_logits_fn, score_windows

MMREC = [sys.executable, "-m", "mmrec"]
SEQ_LEN = 64


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*MMREC, *map(str, args)], capture_output=True, text=True, **kwargs)


# -- data --------------------------------------------------------------------------------------------------
WORDS = {
    "det": ["the", "a", "every", "one", "that"],
    "adj": ["old", "small", "quiet", "red", "distant", "bright", "cold", "narrow", "famous", "heavy"],
    "noun": ["river", "village", "soldier", "garden", "king", "ship", "mountain", "letter", "city", "bridge",
             "teacher", "horse", "storm", "song", "window"],
    "verb": ["crossed", "found", "carried", "watched", "built", "followed", "remembered", "opened", "painted",
             "described"],
    "prep": ["across", "near", "under", "behind", "beyond", "towards", "inside"],
    "conj": ["and then", "but later", "while", "because", "although"],
}


def english_like(seed: int, documents: int) -> list[str]:
    """Deterministic English-like paragraphs: a small grammar over a small vocabulary (learnable quickly)."""
    rng = random.Random(seed)

    def phrase() -> str:
        words = [rng.choice(WORDS["det"])]
        if rng.random() < 0.6:
            words.append(rng.choice(WORDS["adj"]))
        return " ".join([*words, rng.choice(WORDS["noun"])])

    def sentence() -> str:
        text = f"{phrase()} {rng.choice(WORDS['verb'])} {phrase()}"
        if rng.random() < 0.5:
            text += f" {rng.choice(WORDS['prep'])} {phrase()}"
        if rng.random() < 0.3:
            text += f", {rng.choice(WORDS['conj'])} {phrase()} {rng.choice(WORDS['verb'])} {phrase()}"
        return text[0].upper() + text[1:] + "."

    return [" ".join(sentence() for _ in range(rng.randint(4, 9))) for _ in range(documents)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def byte_ids(texts: list[str]) -> torch.Tensor:
    return tokenize_documents(texts, ByteTokenizer(), 256, None).long()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Three disjoint texts: teacher pre-training, calibration (a .jsonl of ~14k bytes), held-out scoring."""
    root = tmp_path_factory.mktemp("corpus")
    calibration = english_like(1, 36)
    assert sum(len(t) for t in calibration) > 10_000
    return {"pretrain": english_like(3, 120), "calibration": write_jsonl(root / "calibration.jsonl", calibration),
            "heldout": english_like(2, 24)}


# -- teachers and their conversions ---------------------------------------------------------------------------
def teacher_config(family: str):
    import transformers as T

    if family == "gpt2":  # fixtures' gpt2 has vocab 240: too small for byte tokens
        return T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ_LEN,
                            **fixtures.TOKENS)
    config = fixtures.family_config(family)
    assert config.vocab_size >= 256
    return config


def pretrain_teacher(family: str, texts: list[str], out: Path, steps: int = 40) -> Path:
    """A tiny teacher that has learnt something (a random one predicts bytes uniformly, so nothing would show
    whether the student moved towards it): a few AdamW steps on English-like text, then save_pretrained.
    No tokenizer.json: teacher and student then use the byte-level tokenizer."""
    import transformers as T

    torch.manual_seed(fixtures.SEED)
    model = T.AutoModelForCausalLM.from_config(teacher_config(family))
    ids = byte_ids(texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - SEQ_LEN, (16,), generator=generator)
        batch = ids[starts[:, None] + torch.arange(SEQ_LEN)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 3.5, f"{family} teacher did not learn (loss {loss.item():.3f})"
    model.eval().save_pretrained(out, max_shard_size="200KB")
    assert not (out / "tokenizer.json").exists()
    return out


@pytest.fixture(scope="module")
def pairs(corpus, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{family: (teacher dir, its shard-convert output)} for a tiny LLaMA and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for family in ("llama", "gpt2"):
        teacher = pretrain_teacher(family, corpus["pretrain"], root / family / "teacher")
        student = root / family / "student"
        convert(ConvertOptions(source=teacher, output=student, quiet=True))
        out[family] = (teacher, student)
    return out


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("model*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def model_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("model*.safetensors*")) if directory.exists() else []


# -- 1. the streamed teacher is the transformers model -----------------------------------------------------
@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_streamed_teacher_logits_match_the_full_model(family, family_models):
    import transformers as T

    from mmrec.streaming.distill.teacher import StreamedTeacher
    from mmrec.streaming.sources import open_source

    checkpoint = family_models[family]
    full = T.AutoModelForCausalLM.from_pretrained(checkpoint.path).eval()
    teacher = StreamedTeacher(open_source(checkpoint.path), torch.device("cpu"))
    assert teacher.num_layers == 2
    generator = torch.Generator().manual_seed(0)
    # two input shapes in one pass, as distill's last, smaller batch does (layer arguments are kept per shape)
    ids = [torch.randint(0, checkpoint.config.vocab_size, shape, generator=generator) for shape in ((2, 16), (3, 9))]
    hidden = [teacher.embed(x) for x in ids]
    for i in range(teacher.num_layers):
        with teacher.layer(i) as layer:
            for j, h in enumerate(hidden):
                hidden[j], attention = teacher.run_layer(layer, h)
                assert attention.shape == hidden[j].shape
    with teacher.head_loaded():
        got = [teacher.logits(h) for h in hidden]
    for x, logits in zip(ids, got):
        with torch.no_grad():
            want = full(input_ids=x).logits.float()
        assert logits.shape == want.shape
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    # outside its context managers nothing of the teacher holds real weights
    assert all(p.is_meta for p in teacher.model.parameters())


def test_streamed_teacher_can_run_twice(family_models):
    import transformers as T

    from mmrec.streaming.distill.teacher import StreamedTeacher
    from mmrec.streaming.sources import open_source

    path = family_models["llama"].path
    full = T.AutoModelForCausalLM.from_pretrained(path).eval()
    teacher = StreamedTeacher(open_source(path), torch.device("cpu"))
    for seed in range(2):
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(seed))
        hidden = teacher.embed(ids)
        for i in range(teacher.num_layers):
            with teacher.layer(i) as layer:
                hidden, _ = teacher.run_layer(layer, hidden)
        with teacher.head_loaded():
            logits = teacher.logits(hidden)
        with torch.no_grad():
            torch.testing.assert_close(logits, full(input_ids=ids).logits.float(), rtol=0, atol=1e-5)


# -- 2. distillation moves the student towards the teacher ----------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_distillation_lowers_layer_errors_and_heldout_loss(family, pairs, corpus, tmp_path):
    teacher, student = pairs[family]
    out = tmp_path / "distilled"
    report = distill(DistillOptions(
        teacher=teacher, student=student, data=[corpus["calibration"]], output=out, tokens=8192,
        seq_len=SEQ_LEN, mixer_steps=20, block_steps=20, e2e_steps=20, batch_size=8, seed=0, device="cpu"))

    assert json.loads((out / REPORT).read_text()) == report
    assert not (out / ".distill" / "activations").exists()  # scratch space goes once the output is whole
    assert not list((out / ".distill").glob("layer-*.safetensors")) and (out / ".distill" / "journal.json").exists()
    assert report["calibration_tokens"] == 8192 and len(report["layers"]) == 2
    for layer in report["layers"]:
        for stage in ("mixer", "block"):
            assert layer[f"{stage}_mse_after"] < layer[f"{stage}_mse_before"], (stage, layer)
    e2e = report["end_to_end"]
    assert e2e["steps"] == 20 and e2e["skipped_steps"] == 0 and e2e["kl_after"] < e2e["kl_before"]

    # same tensors (names, shapes, dtypes) as the conversion, and a strict load
    converted, distilled = checkpoint_tensors(student), checkpoint_tensors(out)
    assert {n: (t.shape, t.dtype) for n, t in distilled.items()} == \
           {n: (t.shape, t.dtype) for n, t in converted.items()}
    before = MMRecModel.from_pretrained(student, strict=True).eval()
    after = MMRecModel.from_pretrained(out, strict=True).eval()

    # held-out loss on text the calibration never saw, both models on the same windows
    windows = heldout_windows(byte_ids(corpus["heldout"]), SEQ_LEN - 1, 32)
    loss_before = score_windows(mmrec_logits_fn(before), windows)["loss"]
    loss_after = score_windows(mmrec_logits_fn(after), windows)["loss"]
    assert loss_after < loss_before, (loss_before, loss_after)

    prompt = torch.tensor([list(b"The old river")])
    generated = after.generate(prompt, max_new_tokens=8, temperature=0.0, cuda_graph=False)
    assert generated.shape == (1, prompt.shape[1] + 8)
    assert torch.equal(generated[:, :prompt.shape[1]], prompt)
    assert int(generated.max()) < after.config.vocab_size


# -- 3. --resume after an interruption gives the same bytes ---------------------------------------------------
def distill_args(teacher: Path, student: Path, data: Path, out: Path, *extra) -> list:
    return ["distill", "--teacher", teacher, "--student", student, "--data", data, "--output", out,
            "--tokens", 4096, "--seq-len", 32, "--mixer-steps", 4, "--block-steps", 4, "--e2e-steps", 4,
            "--batch-size", 8, "--top-k", 16, "--seed", 3, "--device", "cpu", "-q", *extra]


def test_resume_after_interruption_gives_identical_bytes(pairs, corpus, tmp_path):
    teacher, student = pairs["llama"]
    data = corpus["calibration"]
    resumed, clean = tmp_path / "resumed", tmp_path / "clean"

    stopped = run_cli(*distill_args(teacher, student, data, resumed, "--stop-after-layer", 0))
    assert stopped.returncode == 130, stopped.stderr
    assert "--resume" in stopped.stderr
    journal = json.loads((resumed / ".distill" / "journal.json").read_text())
    assert list(journal["layers"]) == ["0"]
    assert (resumed / ".distill" / "layer-0.safetensors").is_file()
    assert not (resumed / ".distill" / "layer-1.safetensors").exists()
    assert not (resumed / REPORT).exists() and model_files(resumed) == []
    assert not (resumed / "config.json").exists()

    again = run_cli(*distill_args(teacher, student, data, resumed, "--resume"))
    assert again.returncode == 0, again.stderr
    assert "2 layers distilled" in again.stdout

    # the same options, uninterrupted (through the Python API the command wraps: no second interpreter)
    distill(DistillOptions(teacher=teacher, student=student, data=[data], output=clean, tokens=4096, seq_len=32,
                           mixer_steps=4, block_steps=4, e2e_steps=4, batch_size=8, top_k=16, seed=3,
                           device="cpu"))
    names = model_files(clean)
    assert names and names == model_files(resumed)
    for name in names:
        assert (resumed / name).read_bytes() == (clean / name).read_bytes(), name
    assert (resumed / "config.json").read_bytes() == (clean / "config.json").read_bytes()
    first, second = (json.loads((d / REPORT).read_text()) for d in (resumed, clean))
    assert first["settings"] == second["settings"]
    assert first["layers"][0]["block_mse_after"] == second["layers"][0]["block_mse_after"]
    assert first["end_to_end"]["kl_after"] == second["end_to_end"]["kl_after"]


def test_resume_with_other_settings_or_inputs_is_refused(pairs, corpus, tmp_path):
    from mmrec.streaming.distill.run import DistillRefused

    teacher, student = pairs["llama"]
    options = dict(teacher=teacher, student=student, data=[corpus["calibration"]], output=tmp_path / "out",
                   tokens=1024, seq_len=32, mixer_steps=1, block_steps=1, e2e_steps=1, batch_size=4, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        distill(DistillOptions(stop_after_layer=0, **options))
    for changed in ({"seed": 1}, {"lr": 5e-4}, {"data": [corpus["calibration"], corpus["calibration"]]}):
        with pytest.raises(DistillRefused, match="other settings"):
            distill(DistillOptions(resume=True, **{**options, **changed}))
    assert not (tmp_path / "out" / REPORT).exists()


def test_layers_as_dask_tasks_on_a_local_cluster_give_the_same_bytes(pairs, corpus, tmp_path):
    """--workers 2: one teacher pass to files, then each layer a task on a real 2-worker LocalCluster."""
    from mmrec.streaming.graph import SchedulerChoice

    teacher, student = pairs["llama"]
    options = dict(teacher=teacher, student=student, data=[corpus["calibration"]], tokens=2048, seq_len=32,
                   mixer_steps=3, block_steps=3, e2e_steps=2, batch_size=8, top_k=16, seed=5, device="cpu")
    in_order = distill(DistillOptions(output=tmp_path / "in-order", **options))
    on_cluster = distill(DistillOptions(output=tmp_path / "cluster", scheduler=SchedulerChoice(workers=2),
                                        **options))
    assert [e["block_mse_after"] for e in on_cluster["layers"]] == [e["block_mse_after"] for e in in_order["layers"]]
    names = model_files(tmp_path / "in-order")
    assert names and names == model_files(tmp_path / "cluster")
    for name in names:
        assert (tmp_path / "cluster" / name).read_bytes() == (tmp_path / "in-order" / name).read_bytes(), name


# -- 4. bad inputs: one clear line, a non-zero exit, nothing written ---------------------------------------
def tiny_tokenizer(texts: list[str], path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def bad_input_runs(pairs, corpus, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, str]]:
    """Every bad-input case, run through the CLI (concurrently: each is mostly interpreter start-up).
    {case: (result, --output, what the error line must name)}."""
    import transformers as T

    root = tmp_path_factory.mktemp("bad")
    teacher, student = pairs["llama"]
    data = corpus["calibration"]
    cases = {}

    def case(name, expect, *, teacher=teacher, student=student, data=data, extra=()):
        out = root / name / "out"
        cases[name] = ([*distill_args(teacher, student, data, out), *extra], out, expect)

    # students that are not a conversion of this teacher
    for name, change in (("narrower", dict(hidden_size=32, intermediate_size=64)),
                         ("shallower", dict(num_hidden_layers=1))):
        other = root / name / "source"
        torch.manual_seed(0)
        T.AutoModelForCausalLM.from_config(teacher_config("llama").__class__(
            **{**teacher_config("llama").to_dict(), **change})).save_pretrained(other)
        convert(ConvertOptions(source=other, output=root / name / "student", quiet=True))
        case(name, str(root / name / "student"), student=root / name / "student")

    # teacher and student with different (valid) tokenizers
    mismatch = root / "tokenizer"
    shutil.copytree(teacher, mismatch / "teacher")
    shutil.copytree(student, mismatch / "student")
    tiny_tokenizer(english_like(5, 4), mismatch / "teacher" / "tokenizer.json")
    tiny_tokenizer(["completely different words", "nothing in common"], mismatch / "student" / "tokenizer.json")
    case("tokenizer", "tokenizer.json", teacher=mismatch / "teacher", student=mismatch / "student")

    # no calibration text
    empty_jsonl = write_jsonl(root / "empty.jsonl", ["", "   "])
    case("empty_jsonl", str(empty_jsonl), data=empty_jsonl)
    empty_txt = root / "empty.txt"
    empty_txt.write_text("")
    case("empty_txt", str(empty_txt), data=empty_txt)

    # bad options
    case("lr_nan", "--lr", extra=("--lr", "nan"))
    case("lr_inf", "--lr", extra=("--lr", "inf"))
    case("e2e_lr_nan", "--e2e-lr", extra=("--e2e-lr", "nan"))
    case("stages", "--stages", extra=("--stages", "bogus"))

    # an earlier, unrelated output
    existing = root / "existing" / "out"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    case("existing", "--output")

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(cases, pool.map(lambda args: run_cli(*args[0]), cases.values())))
    return {name: (results[name], out, expect) for name, (_, out, expect) in cases.items()}


BAD_INPUT_EXITS = {"narrower": 1, "shallower": 1, "tokenizer": 1, "empty_jsonl": 1, "empty_txt": 1, "lr_nan": 2,
                   "lr_inf": 2, "e2e_lr_nan": 2, "stages": 2, "existing": 3}


@pytest.mark.parametrize("name", list(BAD_INPUT_EXITS))
def test_bad_inputs_fail_cleanly_and_write_nothing(name, bad_input_runs):
    result, out, expect = bad_input_runs[name]
    assert result.returncode == BAD_INPUT_EXITS[name], (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (out / REPORT).exists() and model_files(out) == [] and not (out / "config.json").exists()
    if name == "existing":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


# -- 5. shard-convert --init ------------------------------------------------------------------------------------
def test_unknown_init_mode_is_a_usage_error(family_checkpoints, tmp_path):
    out = tmp_path / "out"
    result = run_cli("shard-convert", "--source", family_checkpoints["llama"], "--output", out, "--init", "bogus")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--init" in lines[0] and "bogus" in lines[0], result.stderr
    for mode in ("guide", "zero-mixer", "self-attend"):
        assert mode in lines[0]
    assert not out.exists()


def repeat_kv(v: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """transformers' repeat_kv on a v_proj weight [kv_heads * dh, D]: each kv head repeated in place."""
    return v.view(kv_heads, -1, v.shape[1]).repeat_interleave(heads // kv_heads, dim=0).reshape(-1, v.shape[1])


def test_init_modes_differ_only_in_the_mixer_residual_paths(family_models, tmp_path):
    llama = family_models["llama"]
    outputs = {}
    for mode in ("guide", "zero-mixer", "self-attend", None):
        out = tmp_path / (mode or "default")
        report = convert(ConvertOptions(source=llama.path, output=out, init=mode, quiet=True))
        written = json.loads((out / "conversion_report.json").read_text())
        assert report["options"]["init"] == written["options"]["init"] == (mode or "self-attend")
        outputs[mode or "default"] = checkpoint_tensors(out)

    guide, zero, attend = outputs["guide"], outputs["zero-mixer"], outputs["self-attend"]
    assert set(guide) == set(zero) == set(attend) == set(outputs["default"])
    for name in attend:  # no --init is self-attend, to the byte
        assert torch.equal(attend[name], outputs["default"][name]), name

    layers = llama.config.num_hidden_layers
    residual = {f"blocks.{i}.{suffix}" for i in range(layers)
                for suffix in ("W_z.weight", "W_z.bias", "W_v.weight", "W_v.bias",
                               "multi_mem_attention.W_o.weight", "multi_mem_attention.W_o.bias")}
    differ = {n for n in guide if not torch.equal(guide[n], attend[n])}
    assert differ <= residual, sorted(differ - residual)
    assert {f"blocks.{i}.{w}.weight" for i in range(layers) for w in ("W_v", "W_z")} <= differ
    assert {n for n in guide if not torch.equal(zero[n], attend[n])} == \
           {f"blocks.{i}.W_v.weight" for i in range(layers)}

    source = fixtures.load_safetensors_dir(llama.path)
    for i in range(layers):
        for suffix in ("W_z.weight", "W_z.bias", "W_v.bias"):  # zeroed by self-attend (and zero-mixer)
            name = f"blocks.{i}.{suffix}"
            if name in attend:
                assert not attend[name].any(), name
        assert not zero[f"blocks.{i}.W_v.weight"].any()
        assert guide[f"blocks.{i}.W_v.weight"].abs().sum() > 0  # Xavier in the guide
        o = source[f"model.layers.{i}.self_attn.o_proj.weight"]
        v = repeat_kv(source[f"model.layers.{i}.self_attn.v_proj.weight"], llama.config.num_key_value_heads,
                      llama.config.num_attention_heads)
        torch.testing.assert_close(attend[f"blocks.{i}.W_v.weight"], 10.0 * o @ v, rtol=1e-5, atol=1e-6)


def test_plan_names_the_init_mode(family_checkpoints, tmp_path):
    result = run_cli("shard-convert", "--source", family_checkpoints["llama"], "--output", tmp_path / "out",
                     "--init", "guide", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["options"]["init"] == "guide"
    assert not (tmp_path / "out").exists()
