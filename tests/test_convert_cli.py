"""End-to-end: the real `mmrec` CLI in a subprocess, real checkpoints, a real LocalCluster."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmrec import MMRecModel
from mmrec.streaming.synthetic import write_synthetic_llama
from mmrec.streaming.verify import verify

MMREC = [sys.executable, "-m", "mmrec"]


def run_cli(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*MMREC, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"mmrec {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


def output_bytes(directory: Path) -> dict[str, bytes]:
    """Every file a conversion writes, except the report (it holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "conversion_report.json"}


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    """~60 MB bf16 llama: big enough that a conversion can be killed mid-run."""
    return write_synthetic_llama(tmp_path_factory.mktemp("small") / "llama", "small", "BF16", "20MB")


@pytest.fixture(scope="module")
def clean_small(small_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    run_cli("shard-convert", "--source", small_llama, "--output", out, "--max-shard-size", "4MB", "-q")
    return out


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_converts_loads_strictly_and_runs(family, family_checkpoints, tmp_path):
    source = family_checkpoints[family]
    before = {p: p.read_bytes() for p in source.iterdir()}
    out = tmp_path / "out"
    result = run_cli("shard-convert", "--source", source, "--output", out, "--max-shard-size", "60KB", "--json")
    report = json.loads(result.stdout)
    assert report["source_analysis"]["model_type"] == family
    assert 0 < report["transferred_parameter_share"] < 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, file_name in index["weight_map"].items():
        with safe_open(out / file_name, framework="pt") as f:
            assert name in f.keys()
    model = MMRecModel.from_pretrained(out)  # strict
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits.float()).all()
    assert verify(out, source).ok
    assert {p: p.read_bytes() for p in source.iterdir()} == before  # the source is never written to


def test_threads_workers_and_memory_budget_give_identical_bytes(small_llama, clean_small, tmp_path):
    cluster = tmp_path / "cluster"
    run_cli("shard-convert", "--source", small_llama, "--output", cluster, "--max-shard-size", "4MB",
            "--workers", "2", "-q")
    tight = tmp_path / "tight"
    run_cli("shard-convert", "--source", small_llama, "--output", tight, "--max-shard-size", "4MB",
            "--threads", "1", "--memory-budget", "1MB", "-q")
    reference = output_bytes(clean_small)
    assert len([n for n in reference if n.endswith(".safetensors")]) > 5
    assert output_bytes(cluster) == reference
    assert output_bytes(tight) == reference


def test_sigkill_then_resume_gives_the_same_bytes(small_llama, clean_small, tmp_path):
    out = tmp_path / "out"
    journal = out / ".mmrec-convert" / "journal.jsonl"
    args = [*MMREC, "shard-convert", "--source", str(small_llama), "--output", str(out), "--max-shard-size",
            "4MB", "--threads", "1", "--memory-budget", "1MB", "-q"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the conversion finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "conversion_report.json").exists() and not (out / "config.json").exists()
    assert not list(out.glob("*.safetensors"))  # nothing that looks complete
    refused = run_cli("shard-convert", "--source", small_llama, "--output", out, "-q", check=False)
    assert refused.returncode == 3 and "--resume" in refused.stderr
    changed = run_cli("shard-convert", "--source", small_llama, "--output", out, "--max-shard-size", "4MB",
                      "--seed", "1", "--resume", "-q", check=False)
    assert changed.returncode == 3 and "changed" in changed.stderr
    resumed = run_cli("shard-convert", "--source", small_llama, "--output", out, "--max-shard-size", "4MB",
                      "--resume", "--json", "-q")
    assert json.loads(resumed.stdout)["timings"]["resumed_shards"] >= 2
    assert output_bytes(out) == output_bytes(clean_small)
    assert not (out / ".mmrec-convert").exists()


def test_verify_catches_a_flipped_byte(clean_small, tmp_path):
    assert run_cli("verify", clean_small).returncode == 0
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, data in output_bytes(clean_small).items():
        (damaged / name).write_bytes(data)
    (damaged / "conversion_report.json").write_bytes((clean_small / "conversion_report.json").read_bytes())
    shard = damaged / "model-00002-of-{:05d}.safetensors".format(len(list(damaged.glob("model-*"))))
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run_cli("verify", damaged, check=False)
    assert result.returncode == 1 and "checksum" in result.stderr and shard.name in result.stderr


def test_refusals(family_checkpoints, tmp_path):
    source = family_checkpoints["llama"]
    inside = run_cli("shard-convert", "--source", source, "--output", source / "out", check=False)
    assert inside.returncode == 3 and "inside the source" in inside.stderr
    assert not (source / "out").exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    exists = run_cli("shard-convert", "--source", source, "--output", out, check=False)
    assert exists.returncode == 3 and "--overwrite" in exists.stderr
    run_cli("shard-convert", "--source", source, "--output", out, "--overwrite", "-q")
    assert (out / "conversion_report.json").exists() and (out / "notes.txt").read_text() == "mine"
    # A second run while one holds the output's lock is refused.
    locked = tmp_path / "locked"
    (locked / ".mmrec-convert").mkdir(parents=True)
    fd = os.open(locked / ".mmrec-convert" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        busy = run_cli("shard-convert", "--source", source, "--output", locked, "--resume", check=False)
    finally:
        os.close(fd)
    assert busy.returncode == 3 and "another conversion" in busy.stderr


@pytest.mark.parametrize("args, words", [
    (["--max-shard-size", "0"], "--max-shard-size"),
    (["--dtype", "float7"], "--dtype"),
    (["--workers", "0"], "--workers"),
])
def test_bad_options_exit_2_naming_the_option(family_checkpoints, tmp_path, args, words):
    result = run_cli("shard-convert", "--source", family_checkpoints["llama"], "--output", tmp_path / "o", *args,
                     check=False)
    assert result.returncode == 2 and words in result.stderr
    assert not (tmp_path / "o").exists()


def test_single_file_output_and_dry_run(family_checkpoints, tmp_path):
    source = family_checkpoints["gpt2"]
    dry = run_cli("shard-convert", "--source", source, "--output", tmp_path / "dry", "--dry-run", "--json")
    plan = json.loads(dry.stdout)
    assert plan["tensors"] and not (tmp_path / "dry").exists()
    single = tmp_path / "gpt2-mmrec.safetensors"
    run_cli("shard-convert", "--source", source, "--output", single, "--dtype", "bfloat16", "-q")
    model = MMRecModel.from_pretrained(single)
    assert model.embedding.weight.dtype == torch.bfloat16
    assert len(model.state_dict()) - 1 == len(plan["tensors"])  # tied head listed once in the plan
    assert verify(single, source).ok


def test_guide_python_api(family_checkpoints, tmp_path):
    from mmrec.streaming import ModelWeightConverter, convert_model_weights

    source = family_checkpoints["llama"]
    model = MMRecModel.from_pretrained  # noqa: F841 (the API takes any MM-Rec model)
    reference_out = tmp_path / "ref"
    run_cli("shard-convert", "--source", source, "--output", reference_out, "-q")
    config = json.loads((reference_out / "config.json").read_text())
    from mmrec import MMRecConfig

    target = MMRecModel(MMRecConfig.from_dict(config))
    weights, report = convert_model_weights(source, target, output_path=tmp_path / "api", strict=False,
                                            initialize_new=True)
    assert report["converted_keys"] > 0 and not report["warnings"][1:]
    result = target.load_state_dict(weights, strict=False)
    assert not result.missing_keys or result.missing_keys == ["lm_head.weight"]
    expected = MMRecModel.from_pretrained(reference_out)
    for name, param in expected.state_dict().items():
        assert torch.equal(target.state_dict()[name], param), name

    class EveryKeyIsUnknown(ModelWeightConverter):
        def _keys_match(self, source_pattern, source_key, target_key):
            return False

    _, partial = convert_model_weights(source, target, initialize_new=True, converter=EveryKeyIsUnknown())
    assert partial["converted_keys"] == 0


def test_joins_an_existing_cluster_by_scheduler_file(family_checkpoints, tmp_path):
    """The batch-job recipe of the README: `dask scheduler` + `dask worker` started on their own, then
    shard-convert --scheduler-file; same bytes as the in-process default."""
    source = family_checkpoints["qwen2"]
    scheduler_file = tmp_path / "scheduler.json"
    dask_cli = Path(sys.executable).with_name("dask")
    common = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheduler = subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--dashboard-address", ":0", "--scheduler-file", scheduler_file], **common)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = subprocess.Popen([dask_cli, "worker", "--scheduler-file", scheduler_file, "--nthreads", "2",
                                   "--memory-limit", "0", "--host", "127.0.0.1", "--dashboard-address", ":0"],
                                  **common)
        joined = tmp_path / "joined"
        run_cli("shard-convert", "--source", source, "--output", joined, "--scheduler-file", scheduler_file,
                "--max-shard-size", "50KB", "-q", timeout=300)
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    local = tmp_path / "local"
    run_cli("shard-convert", "--source", source, "--output", local, "--max-shard-size", "50KB", "-q")
    assert output_bytes(joined) == output_bytes(local)
