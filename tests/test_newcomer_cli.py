"""Newcomers' rough edges of `shard-convert`, `plan`, `verify` and `inspect`, through the real CLI on real files:
what a dry run says about an output the real run would refuse, the hint for each kind of existing output,
the lock's message for a concurrent run, an MM-Rec checkpoint given as a source, bad option values (exit 2),
`-q`, sizes without a unit, the help text, a junk .safetensors, `verify` on a source checkpoint, and the two
rates (written vs read+written)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmrec.cli.app import app

EXITS = {"input": 1, "option": 2, "refused": 3}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden state files included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(family_checkpoints) -> Path:
    return family_checkpoints["llama"]


@pytest.fixture(scope="module")
def finished(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    result = cli("shard-convert", "--source", source, "--output", out, "-q")
    assert result.exit_code == 0, result.output
    return out


# -- 3. existing outputs, dry runs, concurrent runs, an MM-Rec source ------------------------------------------
def test_dry_run_into_a_finished_output_says_the_real_run_would_be_refused(source, finished):
    before = tree(finished)
    result = cli("shard-convert", "--source", source, "--output", finished, "--dry-run")
    assert result.exit_code == EXITS["refused"], result.output
    assert "source: llama" in result.stdout  # the plan is still shown
    line = one_error_line(result)
    assert "already holds a finished conversion" in line and "--overwrite" in line and "--resume" not in line
    assert "nothing was written" in line and "the real run would be refused" in line
    assert tree(finished) == before


def test_dry_run_into_a_new_output_says_nothing_was_written(source, tmp_path):
    out = tmp_path / "new"
    result = cli("shard-convert", "--source", source, "--output", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"dry run: nothing was written to {out}"
    assert not out.exists()
    quiet = cli("shard-convert", "--source", source, "--output", out, "--dry-run", "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    as_json = cli("shard-convert", "--source", source, "--output", out, "--dry-run", "--json", "-q")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["tensors"] and as_json.stderr == ""
    assert not out.exists()


def test_a_finished_output_is_not_offered_resume(source, finished):
    before = tree(finished)
    plain = cli("shard-convert", "--source", source, "--output", finished)
    assert plain.exit_code == EXITS["refused"]
    line = one_error_line(plain)
    assert "already holds a finished conversion" in line and "--overwrite" in line and "--resume" not in line
    resumed = cli("shard-convert", "--source", source, "--output", finished, "--resume")
    assert resumed.exit_code == EXITS["refused"]
    line = one_error_line(resumed)
    assert "finished conversion" in line and "nothing to resume" in line and "--overwrite" in line
    both = cli("shard-convert", "--source", source, "--output", finished, "--resume", "--overwrite")
    assert both.exit_code == EXITS["refused"] and "drop --resume to replace it" in one_error_line(both)
    assert tree(finished) == before


def test_an_interrupted_output_is_offered_resume_and_other_files_only_overwrite(source, tmp_path):
    interrupted = tmp_path / "interrupted"
    (interrupted / ".mmrec-convert").mkdir(parents=True)
    (interrupted / ".mmrec-convert" / "run.json").write_text("{}")
    line = one_error_line(cli("shard-convert", "--source", source, "--output", interrupted))
    assert "holds an interrupted conversion" in line and "--resume" in line
    # a dry run of the resume compares the recorded run with this one, as the real run does
    dry = cli("shard-convert", "--source", source, "--output", interrupted, "--resume", "--dry-run", "-q")
    assert dry.exit_code == EXITS["refused"] and dry.stdout == ""
    line = one_error_line(dry)
    assert "cannot --resume" in line and "changed since the interrupted run" in line and "dry run" in line
    assert sorted(p.name for p in (interrupted / ".mmrec-convert").iterdir()) == ["run.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = cli("shard-convert", "--source", source, "--output", other)
    assert result.exit_code == EXITS["refused"]
    line = one_error_line(result)
    assert "exists and is not empty" in line and "--overwrite" in line and "--resume" not in line
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # not even a lock file was made


def test_a_concurrent_run_gets_the_lock_message(source, finished, tmp_path):
    """A live run holds the lock of a non-empty output: every second run (plain, --dry-run, --resume,
    --overwrite) is told that, not "exists"."""
    out = Path(shutil.copytree(finished, tmp_path / "busy"))
    (out / ".mmrec-convert").mkdir()
    fd = os.open(out / ".mmrec-convert" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        before = tree(out)
        for flags in ([], ["--dry-run"], ["--resume"], ["--overwrite"]):
            result = cli("shard-convert", "--source", source, "--output", out, *flags)
            assert result.exit_code == EXITS["refused"], (flags, result.output)
            line = one_error_line(result)
            assert line.startswith(f"error: another conversion is writing to {out}; refusing to run two at once")
        assert tree(out) == before
    finally:
        os.close(fd)


def test_an_mmrec_checkpoint_as_source_is_already_converted(finished, source, tmp_path):
    single = tmp_path / "single.safetensors"
    assert cli("shard-convert", "--source", source, "--output", single, "-q").exit_code == 0
    for converted, why in ((finished, "config.json model_type 'mmrec'"), (single, "MM-Rec tensor names")):
        for args in (["shard-convert", "--source", converted, "--output", tmp_path / "again"],
                     ["plan", converted], ["inspect", converted]):
            result = cli(*args)
            assert result.exit_code == EXITS["input"], (args, result.output)
            line = one_error_line(result)
            assert "already an MM-Rec checkpoint" in line and "already converted" in line and why in line, line
            assert "not a known family" not in line
    assert not (tmp_path / "again").exists()


# -- 4. bad option values exit 2; -q -----------------------------------------------------------------------
@pytest.mark.parametrize("command, args, words", [
    ("shard-convert", ["--dtype", "int8"], "--dtype int8: the output dtype must be a float type"),
    ("plan", ["--dtype", "int8"], "--dtype int8: the output dtype must be a float type"),
    ("shard-convert", ["--num-heads", "7"], "--num_heads 7 must divide the model dim 64 (the source's"),
    ("plan", ["--num-heads", "7"], "--num_heads 7 must divide the model dim 64 (the source's"),
    ("plan", ["--num_heads", "7"], "--num_heads 7 must divide the model dim 64"),
    ("plan", ["--model-dim", "64", "--num-heads", "7"], "--num_heads 7 must divide --model_dim 64"),
    ("plan", ["--model-dim", "66"], "--model_dim 66 is not a multiple of the source's 4 heads"),
    ("plan", ["--vocab-size", "300", "--vocab_size", "200"], "--vocab-size 300 and --vocab_size 200 disagree"),
])
def test_bad_option_values_exit_2(source, tmp_path, command, args, words):
    where = ["--source", source, "--output", tmp_path / "o"] if command == "shard-convert" else [source]
    result = cli(command, *where, *args)
    assert result.exit_code == EXITS["option"], result.output
    assert words in one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_a_source_problem_stays_exit_1_with_size_options(tmp_path, source):
    """Exit 2 only when an option is the cause: a source whose own heads do not divide its dim fails with or
    without --vocab-size, so it stays a bad input (exit 1)."""
    src = Path(shutil.copytree(source, tmp_path / "src"))
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "num_attention_heads": 5}))
    for command in (["plan", src], ["shard-convert", "--source", src, "--output", tmp_path / "o"]):
        result = cli(*command, "--vocab-size", "300")
        assert result.exit_code == EXITS["input"], result.output
        assert "the source's 5 heads do not divide" in one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_quiet_prints_nothing_on_success(source, tmp_path):
    quiet = cli("shard-convert", "--source", source, "--output", tmp_path / "q", "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "q" / "conversion_report.json").exists()
    as_json = cli("shard-convert", "--source", source, "--output", tmp_path / "j", "-q", "--json")
    assert as_json.exit_code == 0 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["converted_keys"] > 0
    failing = cli("shard-convert", "--source", tmp_path / "missing", "--output", tmp_path / "f", "-q")
    assert failing.exit_code == EXITS["input"] and "does not exist" in one_error_line(failing)


# -- 5. sizes without a unit -------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, hint", [("--max-shard-size", "50", "50MB"),
                                                 ("--memory-budget", "512", "512MB"),
                                                 ("--max-shard-size", " 2.5 ", "2.5MB")])
def test_a_bare_number_is_not_a_size(source, tmp_path, option, value, hint):
    result = cli("shard-convert", "--source", source, "--output", tmp_path / "o", option, value)
    assert result.exit_code == EXITS["option"], result.output
    line = one_error_line(result)
    assert line.startswith(f"error: {option} {value.strip()}: a size needs a unit") and hint in line
    assert not (tmp_path / "o").exists()


def test_a_size_with_a_unit_still_works(source, tmp_path):
    result = cli("shard-convert", "--source", source, "--output", tmp_path / "o", "--max-shard-size", "100KB",
                 "--memory-budget", "2MiB", "-q", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["output"]["shards"]) > 1


# -- 7. help, messages ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, shown", [
    ("shard-convert", ["--source PATH", "--vocab-size N", "--num-heads N", "--max-shard-size SIZE",
                       "--no-initialize-new", "--scheduler-file FILE", "-q, --quiet"]),
    ("plan", ["SOURCE", "--vocab-size N", "--no-initialize-new", "--mapping-file FILE", "--layer-map MAP"]),
    ("verify", ["OUTPUT", "--source PATH"]),
    ("inspect", ["SOURCE", "--json"]),
])
def test_help_has_no_odd_placeholders_or_cut_names(command, shown):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=80)
    assert result.exit_code == 0
    text = result.output
    for odd in ("<bool>", "<int>", "<str>", "<path>", "{source}", "{output}", "<list", "…", "--vocab_size,",
                "--no_initialize_new,"):
        assert odd not in text, (odd, text)
    for item in shown:
        assert item in text, (item, text)


def test_underscore_spellings_still_work(source, tmp_path):
    result = cli("plan", source, "--vocab_size", "300", "--no_initialize_new", "--layer_map", "uniform", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["target_config"]["vocab_size"] == 300 and plan["options"]["initialize_new"] is False
    dashed = cli("plan", source, "--vocab-size", "300", "--no-initialize-new", "--layer-map", "uniform", "--json")
    assert dashed.stdout == result.stdout
    # shard-convert takes the same spellings as plan (its --layer_map used to exit 2)
    converted = cli("shard-convert", "--source", source, "--output", tmp_path / "out", "--vocab_size", "300",
                    "--no_initialize_new", "--layer_map", "uniform", "--dry-run", "--json", "-q")
    assert converted.exit_code == 0, converted.output
    assert json.loads(converted.stdout)["options"] == plan["options"]


def test_a_junk_safetensors_is_not_a_safetensors_file(tmp_path):
    junk = tmp_path / "junk" / "model.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(bytes(range(256)) * 8)  # its first 8 bytes read as a header length of ~5e17
    for args in (["inspect", junk], ["plan", junk.parent], ["verify", junk]):
        result = cli(*args)
        assert result.exit_code == EXITS["input"], (args, result.output)
        text = result.stderr
        assert f"{junk}: not a safetensors file" in text, text
        assert "header length" in text and "100000000-byte limit" in text


def test_verify_on_a_source_checkpoint_says_convert_it_first(source):
    result = cli("verify", source)
    assert result.exit_code == EXITS["input"]
    problems = result.stderr.strip().splitlines()
    assert len(problems) == 1, problems
    assert "holds no conversion report" in problems[0] and "looks like a source checkpoint" in problems[0]
    assert "model_type 'llama'" in problems[0] and "convert it first" in problems[0]
    assert "did not finish" not in problems[0]
    assert result.stdout.startswith("FAILED (1 problem): ")


def test_verify_names_why_a_report_is_missing(finished, tmp_path):
    ok = cli("verify", finished)
    assert ok.exit_code == 0 and ok.stdout.startswith("OK: ") and "1 problem" not in ok.stdout
    removed = Path(shutil.copytree(finished, tmp_path / "removed"))
    (removed / "conversion_report.json").unlink()
    result = cli("verify", removed)
    assert result.exit_code == EXITS["input"] and result.stdout.startswith("FAILED (1 problem): ")
    assert "no checksum can be checked" in result.stderr and "source checkpoint" not in result.stderr
    (removed / ".mmrec-convert").mkdir()  # a run stopped before its report
    result = cli("verify", removed)
    assert "the conversion did not finish" in result.stderr and "--resume" in result.stderr


def test_the_two_rates_say_what_they_measure(source, tmp_path):
    result = cli("shard-convert", "--source", source, "--output", tmp_path / "o")
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if line.startswith("converted ")]
    assert progress and ", written " in progress[-1] and "/s, ETA" in progress[-1]
    time_line = next(line for line in result.stdout.splitlines() if line.startswith("time: "))
    assert "/s read+written over the whole run" in time_line
