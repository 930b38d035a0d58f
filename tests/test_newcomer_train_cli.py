"""Newcomers' rough edges of `mmrec synth`, `finetune`, `demo`, `distill` and the app: the real CLI
(typer's CliRunner in-process, a subprocess where a terminal matters) on real files."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import mmrec
from mmrec.cli.app import app
from mmrec.safetensors_format import read_header

MMREC = [sys.executable, "-m", "mmrec"]
SENTENCES = ["The river runs past the old mill and into the lake.",
             "A small boat crossed the lake at dawn, carrying bread to the village.",
             "The village baker wakes before the sun and lights the oven."]


def invoke(*args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones too), by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def stored_dtypes(directory: Path) -> set[str]:
    return {span.dtype for f in directory.glob("*.safetensors") for span in read_header(f).tensors.values()}


def with_terminal_stderr(args: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (a person at a shell); returns (exit code, what stderr showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(), b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """`mmrec synth DIR --preset tiny`: a bf16 Hugging Face llama folder."""
    out = tmp_path_factory.mktemp("nc") / "tiny-llama"
    result = invoke("synth", out, "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nc") / "tiny-mmrec"
    result = invoke("shard-convert", "--source", llama, "--output", out, "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nc") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(SENTENCES[i % 3:] + SENTENCES[:i % 3])}) + "\n"
                            for i in range(12)))
    return path


def finetune_args(checkpoint: Path, data: Path, output: Path, *extra) -> list:
    return ["finetune", "--checkpoint", checkpoint, "--data", data, "--output", output, "--num-steps", "2",
            "--batch-size", "2", "--seq-len", "8", "--device", "cpu", "--threads", "1", "-q", *extra]


# -- 7. --version and help ----------------------------------------------------------------------------------
def test_version_prints_the_version_and_exits_0():
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"mmrec {mmrec.__version__}\n"


COMMANDS = ["synth", "demo", "finetune", "distill"]


@pytest.mark.parametrize("width", [50, 80, 120])
@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_has_no_type_placeholders_and_whole_option_names(command, width):
    result = invoke(*([command] if command else []), "--help", terminal_width=width)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for placeholder in ("<bool>", "<str>", "<int", "<float>", "<path>", "<list[", "list[Path]", "…"):
        assert placeholder not in text, (placeholder, text)
    assert not re.search(r"\{\w+\}", text), text  # typer's `{output}` for an argument
    assert not re.search(r"\w-\n", text), text  # no word (an option name, shard-convert) cut at a hyphen
    group = get_command(app)
    params = group.params if not command else group.commands[command].params
    for param in params:
        if not getattr(param, "hidden", False):
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("-"):
                    assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", text, re.M), (name, text)


def test_synth_usage_names_its_argument():
    usage = invoke("synth", "--help").stdout.splitlines()[0]
    assert usage == "Usage: mmrec synth [OPTIONS] DIR"


# -- 4. bad synth options exit 2 ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--preset", "medium"], ["--preset", "'medium'", "tiny, small, 1b, 7b, 13b"]),
    (["--dtype", "f8"], ["--dtype", "'f8'", "BF16"]),
    (["--max-shard-size", "0"], ["--max-shard-size"]),
])
def test_bad_synth_options_exit_2_in_one_line(tmp_path, args, words):
    result = invoke("synth", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out").exists()


# -- 3. synth into a non-empty directory ----------------------------------------------------------------------
def test_synth_refuses_a_non_empty_directory_and_keeps_it(converted, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    for name, data in files(converted).items():
        (target / name).write_bytes(data)
    before = files(target)
    result = invoke("synth", target, "-q")
    assert result.exit_code == 3, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "--overwrite" in lines[0], result.stderr
    assert files(target) == before
    (tmp_path / "a-file").write_text("x")
    refused = invoke("synth", tmp_path / "a-file", "--overwrite", "-q")
    assert refused.exit_code == 3 and "not a directory" in refused.stderr


def test_synth_overwrite_leaves_what_a_fresh_synth_writes(llama, tmp_path):
    """--overwrite over a sharded conversion (index, report, tokenizer, an interrupted run's state): the
    result is byte for byte a fresh synth, and a file mmrec did not write stays."""
    source = tmp_path / "src"
    source.mkdir()
    for name, data in files(llama).items():
        (source / name).write_bytes(data)
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    target = tmp_path / "ckpt"
    assert invoke("shard-convert", "--source", source, "--output", target, "--max-shard-size", "100KB",
                  "-q").exit_code == 0
    (target / ".mmrec-convert").mkdir()
    (target / ".mmrec-convert" / "run.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    assert {"conversion_report.json", "tokenizer.json", "model.safetensors.index.json"} <= set(os.listdir(target))

    result = invoke("synth", target, "--overwrite", "--max-shard-size", "200KB")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0].endswith("(kept 1 other file: notes.txt)"), result.stderr
    fresh = tmp_path / "fresh"
    assert invoke("synth", fresh, "--max-shard-size", "200KB", "-q").exit_code == 0
    assert files(target) == {**files(fresh), "notes.txt": b"mine"}


def test_synth_overwrite_refuses_a_directory_a_conversion_is_writing(tmp_path):
    target = tmp_path / "busy"
    (target / ".mmrec-convert").mkdir(parents=True)
    (target / "config.json").write_text("{}")
    fd = os.open(target / ".mmrec-convert" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = invoke("synth", target, "--overwrite", "-q")
    finally:
        os.close(fd)
    assert result.exit_code == 3 and "conversion is writing" in result.stderr, result.output
    assert (target / "config.json").read_text() == "{}"


# -- 7. synth progress ----------------------------------------------------------------------------------------
def test_synth_shows_progress_unless_quiet(tmp_path):
    result = invoke("synth", tmp_path / "loud", "--preset", "small")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"writing a small llama checkpoint to {tmp_path / 'loud'}: 33.7 MB"), lines
    assert re.search(r"^wrote 33\.7 MB/33\.7 MB \(100%\), (\d+)/\1 tensors, .*/s.*ETA", lines[-1]), lines
    assert result.stdout == f"wrote a small llama checkpoint to {tmp_path / 'loud'}\n"
    quiet = invoke("synth", tmp_path / "quiet", "--preset", "small", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert files(tmp_path / "quiet") == files(tmp_path / "loud")


# -- 5. dropout of a conversion, dtype of a fine-tuned model ------------------------------------------------
def test_a_conversion_has_no_dropout(converted):
    import torch

    assert json.loads((converted / "config.json").read_text())["dropout"] == 0.0
    model = mmrec.MMRecModel.from_pretrained(converted)
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.0}


def test_finetune_saves_in_the_checkpoints_dtype(converted, text, tmp_path):
    assert stored_dtypes(converted) == {"BF16"}
    result = invoke(*finetune_args(converted, text, tmp_path / "bf16", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["save_dtype"] == "bfloat16"
    assert stored_dtypes(tmp_path / "bf16") == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    size = sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    assert sum(p.stat().st_size for p in (tmp_path / "bf16").glob("*.safetensors")) < 1.1 * size

    wide = invoke(*finetune_args(converted, text, tmp_path / "f32", "--save-dtype", "float32"))
    assert wide.exit_code == 0, wide.output
    assert stored_dtypes(tmp_path / "f32") == {"F32"}


def test_finetune_saves_float32_when_the_config_names_no_dtype_it_knows(converted, text, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for name, data in files(converted).items():
        (checkpoint / name).write_bytes(data)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "torch_dtype": "auto"}))
    result = invoke(*finetune_args(checkpoint, text, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert stored_dtypes(tmp_path / "out") == {"F32"}


# -- 3. finetune on a Hugging Face folder ---------------------------------------------------------------------
@pytest.mark.parametrize("fresh", [False, True])
def test_finetune_on_a_hugging_face_folder_says_how_to_convert_it(llama, text, tmp_path, fresh):
    result = invoke(*finetune_args(llama, text, tmp_path / "out", *(["--fresh"] if fresh else [])))
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {llama}: is a 'llama' checkpoint, not MM-Rec"), lines
    assert not (tmp_path / "out").exists()
    if fresh:
        return
    # The command it names does the job: run it, then fine-tune what it wrote.
    command = shlex.split(re.search(r"`(mmrec shard-convert [^`]*)`", lines[0]).group(1))
    assert command[:2] == ["mmrec", "shard-convert"]
    converted_here = Path(command[command.index("--output") + 1])
    assert converted_here == llama.parent / "tiny-llama-mmrec"
    assert invoke(*command[1:], "-q").exit_code == 0
    done = invoke(*finetune_args(converted_here, text, tmp_path / "out"))
    assert done.exit_code == 0, done.output


# -- 7. say something before the slow start -------------------------------------------------------------------
def test_finetune_and_distill_say_what_they_load_at_a_terminal(converted, llama, text, tmp_path):
    missing = tmp_path / "missing.jsonl"
    finetune = [*MMREC, "finetune", "--checkpoint", str(converted), "--data", str(missing), "--num-steps", "1",
                "--output", str(tmp_path / "ft"), "--device", "cpu"]
    code, shown = with_terminal_stderr(finetune)
    lines = shown.strip().splitlines()
    assert code == 1 and lines[0] == f"loading {converted} ..." and lines[-1].startswith("error: "), shown
    piped = subprocess.run(finetune, capture_output=True, text=True)  # a script gets just the error
    assert piped.returncode == 1 and len(piped.stderr.strip().splitlines()) == 1, piped.stderr

    distill = [*MMREC, "distill", "--teacher", str(llama), "--student", str(converted), "--data", str(missing),
               "--output", str(tmp_path / "ds"), "--device", "cpu"]
    code, shown = with_terminal_stderr(distill)
    lines = shown.strip().splitlines()
    assert code == 1 and lines[0] == f"loading {llama} (teacher) and {converted} (student) ...", shown
    assert lines[-1].startswith("error: ") and str(missing) in lines[-1], shown
    quiet = with_terminal_stderr([*distill, "-q"])[1]
    assert "loading" not in quiet


# -- demo ------------------------------------------------------------------------------------------------------
def test_demo_refuses_a_directory_of_other_files_and_reruns_in_its_own(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    refused = invoke("demo", "--output", mine)
    assert refused.exit_code == 3, refused.output
    assert refused.stderr.splitlines()[-1].startswith(f"error: --output {mine}: holds files the demo did not "
                                                      "write (thesis.txt)")
    assert files(mine) == {"thesis.txt": b"keep me"}

    out = tmp_path / "demo-out"
    for _ in range(2):  # the second run replaces the first one's checkpoints
        result = invoke("demo", "--output", out)
        assert result.exit_code == 0, result.output
        assert "generated token ids" in result.stdout
    assert sorted(os.listdir(out)) == ["tiny-llama", "tiny-mmrec"]
