"""Converting straight from a URL (docs/remote.md): the real `mmrec` CLI in a subprocess against real HTTP
servers on 127.0.0.1 (tests/test_remote_servers.py), compared byte for byte with converting the same files
from local disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_remote_servers import Faults, serve_directory, serve_hub

_SCRIPT = Path(sys.executable).with_name("mmrec")
MMREC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mmrec"]
SHARD = "60KB"  # several output shards from the tiny llama
FAST_RETRIES = {"MMREC_HTTP_BACKOFF": "0.01", "MMREC_HTTP_TIMEOUT": "20"}
TOKEN = "hf_SECRETtoken0123456789"


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    full_env.update(FAST_RETRIES)
    full_env.update(env or {})
    return subprocess.run([*MMREC, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=120)


def output_bytes(directory: Path) -> dict[str, bytes]:
    """Every file a conversion writes, except the report (it holds timings and the source's address)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "conversion_report.json"}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def www(family_checkpoints, tmp_path_factory) -> Path:
    """What the servers serve: the tiny llama (3 safetensors shards + index, config, tokenizer) at
    /llama/, and as a Hub repo at /org/tiny/main/."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(family_checkpoints["llama"], root / "llama")
    shutil.copytree(family_checkpoints["llama"], root / "org" / "tiny" / "main")
    return root


@pytest.fixture(scope="module")
def local(www, tmp_path_factory) -> Path:
    """The reference: the same files converted from local disk."""
    out = tmp_path_factory.mktemp("local") / "out"
    result = run_cli("shard-convert", "--source", www / "llama", "--output", out, "--max-shard-size", SHARD, "-q")
    assert result.returncode == 0, result.stderr
    return out


def tensor_ranges(source_dir: Path, names) -> dict[str, list[tuple[int, int]]]:
    """file name -> inclusive byte ranges of these (normalized) source tensors in the local copy."""
    from mmrec.streaming.sources import open_source

    catalog = open_source(source_dir)
    out: dict[str, list] = {}
    for name in names:
        file, start, end = catalog.tensors[name].byte_range()
        if end > start:
            out.setdefault(Path(file).name, []).append((start, end - 1))
    return {k: sorted(v) for k, v in out.items()}


def data_ranges(server, source_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """file name -> byte ranges the server sent of each weight file's data section (headers left out)."""
    from mmrec.safetensors_format import read_header

    starts = {p.name: read_header(p).data_start for p in source_dir.glob("*.safetensors")}
    out: dict[str, list] = {}
    for r in server.requests("GET", ".safetensors"):
        name = r.path.rsplit("/", 1)[-1]
        if r.status == 206 and r.range[1] >= starts[name]:
            assert r.range[0] >= starts[name], "a header read reached into the data section"
            out.setdefault(name, []).append((r.range[0], r.range[0] + r.sent - 1))
    return {k: sorted(v) for k, v in out.items()}


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [tuple(x) for x in out]


def read_sources(report: dict, out: Path, shards: set[str] | None = None) -> set[str]:
    """Source tensors the report says were read, for the tensors of these output shards (default: all)."""
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    return {source for name, t in report["tensors"].items()
            if shards is None or weight_map[name] in shards for source in t["sources"]}


def test_https_directory_gives_the_bytes_of_a_local_conversion_fetching_each_byte_once(www, local, tmp_path):
    with serve_directory(www) as server:
        out = tmp_path / "out"
        result = run_cli("shard-convert", "--source", f"{server.url}/llama/", "--output", out,
                         "--max-shard-size", SHARD, "--json", "-q")
        assert result.returncode == 0, result.stderr
        fetched = data_ranges(server, www / "llama")
    assert output_bytes(out) == output_bytes(local)  # shards, index, config, tokenizer/generation files
    report = json.loads(result.stdout)
    assert report["source_analysis"]["files"][0].startswith(f"{server.url}/llama/model-0000")
    needed = tensor_ranges(www / "llama", read_sources(report, out))
    for name, ranges in fetched.items():  # no byte of a tensor fetched twice...
        assert all(b < c for (_, b), (c, _) in zip(ranges, ranges[1:])), f"{name}: overlapping range requests"
    assert {k: merged(v) for k, v in fetched.items()} == {k: merged(v) for k, v in needed.items()}  # ...nor left out


def test_verify_recomputes_from_a_url_source(www, local, tmp_path):
    """`mmrec verify OUT --source URL` recomputes every transferred tensor from the remote source."""
    with serve_directory(www) as server:
        result = run_cli("verify", local, "--source", f"{server.url}/llama/", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["ok"] and verdict["recomputed"] > 0


def test_hub_urls_send_the_token_to_the_hub_only_and_never_show_it(www, local, tmp_path):
    hub, cdn = serve_hub(www, token=TOKEN)
    with hub, cdn:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
        out = tmp_path / "out"
        result = run_cli("shard-convert", "--source", "hf://org/tiny@main", "--output", out,
                         "--max-shard-size", SHARD, env=env)
        assert result.returncode == 0, result.stderr
        assert output_bytes(out) == output_bytes(local)
        assert cdn.requests() and all(r.authorization is None for r in cdn.log)  # another origin: no token
        assert hub.log and all(r.authorization == f"Bearer {TOKEN}" for r in hub.log)
        assert TOKEN not in result.stdout + result.stderr
        assert all(TOKEN.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())

        denied = run_cli("shard-convert", "--source", "hf://org/tiny", "--output", tmp_path / "denied",
                         env={**env, "HF_TOKEN": "hf_WRONGtoken987"})
        line = one_error_line(denied)
        assert denied.returncode == 1 and denied.stdout == ""
        assert f"{hub.url}/org/tiny/resolve/main/model.safetensors.index.json" in line and "401" in line
        assert "hf_WRONGtoken987" not in denied.stderr and not (tmp_path / "denied").exists()


def test_missing_files_are_one_line_naming_the_url(www, tmp_path):
    broken = tmp_path / "www" / "broken"
    shutil.copytree(www / "llama", broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    (tmp_path / "www" / "torch").mkdir()
    (tmp_path / "www" / "torch" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really")
    with serve_directory(tmp_path / "www") as server:
        cases = {"nothing": ("/nowhere/", [f"{server.url}/nowhere/: no model.safetensors.index.json or "
                                           "model.safetensors there"]),
                 "shard": ("/broken/", [f"{server.url}/broken/model-00002-of-00003.safetensors: not found "
                                        "(HTTP 404)"]),
                 "torch": ("/torch", [f"{server.url}/torch/pytorch_model.bin", "not supported from a URL"])}
        for case, (path, fragments) in cases.items():
            result = run_cli("shard-convert", "--source", server.url + path, "--output", tmp_path / case)
            line = one_error_line(result)
            assert result.returncode == 1 and all(f in line for f in fragments), (case, line)
            assert not (tmp_path / case).exists()


def test_dropped_connections_and_503s_on_a_cluster_still_give_identical_bytes(www, local, tmp_path):
    faults = Faults(seed=7, p503=0.25, pdrop=0.25, limit=30)
    with serve_directory(www, faults=faults) as server:
        out = tmp_path / "out"
        result = run_cli("shard-convert", "--source", f"{server.url}/llama", "--output", out,
                         "--max-shard-size", SHARD, "--workers", "2", "-q")
        assert result.returncode == 0, result.stderr
    assert faults.count["503"] >= 3 and faults.count["drop"] >= 3, faults.count
    assert output_bytes(out) == output_bytes(local)


def test_a_file_changing_mid_run_is_an_error_naming_it(www, tmp_path):
    with serve_directory(www) as server:
        changing = "/llama/model-00002-of-00003.safetensors"
        server.etag_changes[changing] = 2  # the header's two reads see one version, the tensor reads another
        out = tmp_path / "out"
        result = run_cli("shard-convert", "--source", f"{server.url}/llama/", "--output", out,
                         "--max-shard-size", SHARD, "--threads", "1")
    line = one_error_line(result)
    assert result.returncode == 1
    assert f"{server.url}{changing}: the file changed on the server" in line and "ETag" in line
    assert not (out / "conversion_report.json").exists() and not list(out.glob("*.safetensors"))


def test_resume_after_an_outage_fetches_only_unfinished_shards(www, local, tmp_path):
    out = tmp_path / "out"
    journal = out / ".mmrec-convert" / "journal.jsonl"
    args = ["shard-convert", "--output", out, "--max-shard-size", SHARD, "--threads", "1"]
    with serve_directory(www) as server:
        server.down_after = 6 + 12  # the 3 files' headers (2 reads each), then 12 tensor reads, then 503s
        failed = run_cli(*args, "--source", f"{server.url}/llama/", env={"MMREC_HTTP_RETRIES": "2"})
        line = one_error_line(failed)
        assert failed.returncode == 4 and "--resume" in line
        assert "cannot read from the server: HTTP 503 Service Unavailable (gave up after 3 failed attempts)" in line
        kept = {json.loads(x)["shard"] for x in journal.read_text().splitlines()}
        shards = set(json.loads((local / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert kept and kept < shards  # the outage came mid-run: some shards done, some not

        server.down_after = None  # the server is back, but with one file replaced: --resume is refused
        server.etag_changes["/llama/model-00001-of-00003.safetensors"] = 0
        refused = run_cli(*args, "--source", f"{server.url}/llama/", "--resume")
        assert refused.returncode == 3 and "the source changed" in one_error_line(refused)

        server.etag_changes.clear()  # the same files again: --resume continues
        server.log.clear()
        resumed = run_cli(*args, "--source", f"{server.url}/llama/", "--resume", "--json", "-q")
        assert resumed.returncode == 0, resumed.stderr
        fetched = data_ranges(server, www / "llama")
    report = json.loads(resumed.stdout)
    assert report["timings"]["resumed_shards"] == len(kept)
    assert output_bytes(out) == output_bytes(local)
    redone = {s for s in report["output"]["shards"] if s not in kept}
    needed = tensor_ranges(www / "llama", read_sources(report, out, redone))
    assert {k: merged(v) for k, v in fetched.items()} == {k: merged(v) for k, v in needed.items()}
    assert read_sources(report, out, kept) - read_sources(report, out, redone)  # so some were not fetched again


def test_inspect_and_plan_read_only_headers_from_a_url(www):
    local_inspect = json.loads(run_cli("inspect", www / "llama", "--json").stdout)
    with serve_directory(www) as server:
        inspected = run_cli("inspect", f"{server.url}/llama/", "--json")
        planned = run_cli("plan", f"{server.url}/llama/", "--json")
        weight_gets = server.requests("GET", ".safetensors")
    remote = json.loads(inspected.stdout)
    for key in ("source", "files", "aux_files"):
        local_inspect.pop(key), remote.pop(key)
    assert remote == local_inspect
    assert json.loads(planned.stdout)["source_analysis"]["model_type"] == "llama"
    assert weight_gets and all(r.range[1] < 4096 for r in weight_gets)  # length + header of each file, twice


def test_an_upper_case_scheme_converts_like_a_lower_case_one(www, local, tmp_path):
    """`HTTP://...` is a URL (paths.remote_url) everywhere, write tasks included: no "No such file"."""
    with serve_directory(www) as server:
        out = tmp_path / "out"
        result = run_cli("shard-convert", "--source", f"{server.url.upper()}/llama/", "--output", out,
                         "--max-shard-size", SHARD, "-q")
    assert result.returncode == 0, result.stderr
    assert output_bytes(out) == output_bytes(local)


def test_a_server_failing_on_tokenizer_files_is_bad_input_without_a_resume_hint(www, tmp_path):
    from test_remote_servers import RangeHandler, Server

    class FailsTokenizerFiles(RangeHandler):
        def serve(self, head: bool) -> None:
            if "tokenizer" in self.path:
                return self.answer(self.path, 503, b"down\n")
            super().serve(head)

    with Server(FailsTokenizerFiles, "static", root=www) as server:
        result = run_cli("shard-convert", "--source", f"{server.url}/llama/", "--output", tmp_path / "out",
                         env={"MMREC_HTTP_RETRIES": "1"})
    line = one_error_line(result)  # probed before the output is touched: nothing to resume, exit 1 (not 4)
    assert result.returncode == 1 and "--resume" not in line and not (tmp_path / "out").exists(), line
    assert line.startswith(f"error: {server.url}/llama/tokenizer") and "cannot read from the server" in line


def test_an_outage_during_verify_gives_no_resume_hint(www, local):
    """A network failure after cataloging is exit 4, but `verify` has no --resume to suggest."""
    with serve_directory(www) as server:
        server.down_after = 6  # the 3 files' headers (2 reads each), then 503s
        result = run_cli("verify", local, "--source", f"{server.url}/llama/", env={"MMREC_HTTP_RETRIES": "1"})
    line = one_error_line(result)
    assert result.returncode == 4 and "cannot read from the server: HTTP 503" in line, line
    assert "--resume" not in line
