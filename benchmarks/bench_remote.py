"""Converting straight from a URL against downloading first, over loopback HTTP (docs/remote.md).

    python benchmarks/bench_remote.py [--layers 9] [--repeat 2] [--work DIR]

Serves a synthetic bf16 LLaMA checkpoint (the 1b preset's widths with --layers layers: ~1.05 GB at 9, in
shards of 500 MB) from a loopback HTTP server with range support (the static server of
tests/test_remote_servers.py: sendfile, keep-alive), and times, each cold (sync + drop_caches first, in its
own memory cgroup, wall time including a final sync; benchmarks/harness.py):

  remote              mmrec shard-convert --source http://127.0.0.1:PORT/src/ --output OUT
  curl                curl downloading the same files (weights, index, config) from the same server
  download_convert    curl, then mmrec shard-convert of the downloaded copy (the path without this feature)
  local               mmrec shard-convert of the source on local disk (no network: the floor)

in --repeat rounds of all four (the best wall time of each is kept, all are listed), and checks that
`remote`, `download_convert` and `local` wrote identical bytes. Results: benchmarks/results/remote.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from harness import MIB, machine_info, run_measured, tree_bytes  # noqa: E402

MMREC = str(ROOT / ".venv" / "bin" / "mmrec")


def digest_tree(directory: Path) -> dict[str, str]:
    """sha256 of every output file except the report (it holds timings and the source's address)."""
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != "conversion_report.json":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(16 * MIB), b""):
                    h.update(block)
            out[p.name] = h.hexdigest()
    return out


def write_source(directory: Path, layers: int) -> Path:
    from mmrec.streaming import synthetic

    vocab, hidden, intermediate, _, heads, kv_heads = synthetic.PRESETS["1b"]
    synthetic.PRESETS["bench-remote"] = (vocab, hidden, intermediate, layers, heads, kv_heads)
    return synthetic.write_synthetic_llama(directory, "bench-remote", "BF16", "500MB")


def summary(runs: list, nbytes: int) -> dict:
    best = min(runs, key=lambda m: m.wall_s)
    return {"wall_s": round(best.wall_s, 3), "mb_per_s": round(nbytes / MIB / best.wall_s, 1),
            "all_wall_s": [round(m.wall_s, 3) for m in runs],
            "peak_rss_anon_mib": round(max(m.peak_rss_anon for m in runs) / MIB, 1),
            "returncodes": [m.returncode for m in runs],
            "cpu_user_s": round(best.cpu_user_s, 2), "cpu_system_s": round(best.cpu_system_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of all cases (the best wall time is kept)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "remote.json")
    args = parser.parse_args()

    from test_remote_servers import serve_directory

    work = Path(args.work or tempfile.mkdtemp(prefix="mmrec-bench-remote-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "www" / "src"
    if not (src / "config.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        started = time.perf_counter()
        write_source(src, args.layers)
        print(f"wrote {tree_bytes(src) / 1e9:.2f} GB source in {time.perf_counter() - started:.1f} s")
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    nbytes = tree_bytes(src)
    results: dict = {"benchmark": "remote", "source_bytes": nbytes, "source_files": names, "layers": args.layers,
                     "machine": machine_info(), "server": "tests/test_remote_servers.py serve_directory "
                                                           "(loopback, ThreadingHTTPServer, sendfile)",
                     "command": f"python benchmarks/bench_remote.py --layers {args.layers} --repeat {args.repeat}",
                     "cases": {}}

    runs: dict[str, list] = {}

    def log(case: str, m) -> None:
        runs.setdefault(case, []).append(m)
        results["cases"][case] = summary(runs[case], nbytes)
        print(f"{case:18s} {m.wall_s:7.2f} s  {nbytes / MIB / m.wall_s:7.1f} MiB/s  peak RssAnon "
              f"{m.peak_rss_anon / MIB:7.1f} MiB  rc={m.returncode}")
        if m.returncode != 0:
            print(m.stderr_tail)

    with serve_directory(work / "www") as server:
        base = f"{server.url}/src/"
        curl = ["curl", "-sS", "--fail", "--output-dir", str(work / "download"), "--remote-name-all",
                *(base + n for n in names)]
        script = (f"{' '.join(curl)} && {MMREC} shard-convert --source {work / 'download'} "
                  f"--output {work / 'out-download'} -q")
        for _ in range(args.repeat):  # rounds of every case, so a slow moment of the machine hits all alike
            for d in ("out-remote", "download", "out-download", "out-local"):
                shutil.rmtree(work / d, ignore_errors=True)
            log("remote", run_measured([MMREC, "shard-convert", "--source", base, "--output",
                                        str(work / "out-remote"), "-q"], "remote"))
            (work / "download").mkdir()
            log("curl", run_measured(curl, "curl"))
            shutil.rmtree(work / "download")
            (work / "download").mkdir()
            log("download_convert", run_measured(["bash", "-c", script], "download_convert"))
            log("local", run_measured([MMREC, "shard-convert", "--source", str(src), "--output",
                                       str(work / "out-local"), "-q"], "local"))
        requests = len(server.log)
    results["repeat"] = args.repeat
    identical = digest_tree(work / "out-remote") == digest_tree(work / "out-download") == digest_tree(
        work / "out-local")
    results["identical_outputs"] = identical
    results["server_requests"] = requests
    cases = results["cases"]
    results["remote_vs_download_convert"] = round(cases["download_convert"]["wall_s"] / cases["remote"]["wall_s"], 2)
    print(f"identical outputs: {identical}; download+convert / remote = {results['remote_vs_download_convert']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
