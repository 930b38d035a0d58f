"""Where a conversion's CPU time goes: `perf record` of one cold `mmrec shard-convert`, samples grouped
into a few buckets by symbol (kernel and user space, every thread).

    .venv/bin/python benchmarks/profile_convert.py SRC --label after [--engine DIR] [--flags "--init guide"]

--engine: a checkout with its own .venv (default: this one). Adds {label: buckets} to
benchmarks/results/profile_convert.json. Needs `perf` and root (drop_caches).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import drop_caches  # noqa: E402

RESULTS = HERE / "results" / "profile_convert.json"
SAMPLE_HZ = 499
BUCKETS = [  # (bucket, regex on "dso symbol"), first match wins
    ("float64 matrix product (MKL dgemm)", r"mkl_blas|gblock_by_k"),
    ("kernel: copying bytes into the page cache / out of it", r"copy_folio_from_iter|__pi_memcpy|_copy_to_iter|"
                                                              r"copy_page|filemap_read|memcpy_erms"),
    ("kernel: page faults, page allocation, memcg charges", r"page_fault|clear_page|do_anonymous_page|pte|"
                                                            r"memcg|alloc_pages|get_page_from_freelist|"
                                                            r"folio|lruvec|rmap|handle_mm_fault|unmap"),
    ("checksums (xxh3)", r"XXH3|xxhash"),
    ("random values (numpy bit generators)", r"_philox|_pcg64|random_raw|_common"),
    ("torch element-wise, casts, gathers", r"libtorch|libc10"),
    ("numpy element-wise", r"_multiarray_umath|FLOAT_|_aligned_contig"),
    ("Python interpreter (imports, scheduling, glue)", r"libpython|python3"),
    ("kernel: locks, scheduling, other", r"\[kernel"),
]


def profile(mmrec: str, source: Path, extra: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mmrec-profile-", dir=source.parent))
    data = work / "perf.data"
    try:
        drop_caches()
        start = time.perf_counter()
        subprocess.run(["perf", "record", "-F", str(SAMPLE_HZ), "-o", str(data), "--", mmrec, "shard-convert", "--source",
                        str(source), "--output", str(work / "out"), "-q", *extra],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "-n", "--sort", "dso,sym",
                                 "--stdio", "-g", "none"], capture_output=True, text=True, check=True).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shares: dict[str, float] = {name: 0.0 for name, _ in BUCKETS}
    shares["other"] = 0.0
    samples = 0
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\d+)\s+(.*)", line)
        if not match:
            continue
        share, what = float(match.group(1)), match.group(3)
        samples += int(match.group(2))
        bucket = next((name for name, pattern in BUCKETS if re.search(pattern, what)), "other")
        shares[bucket] += share
    return {"wall_seconds_under_perf": wall, "cpu_seconds": samples / SAMPLE_HZ, "extra_flags": extra,
            "share_of_cpu_samples_percent": shares}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("--label", required=True)
    ap.add_argument("--engine", type=Path, default=HERE.parent)
    ap.add_argument("--flags", default="", help='more shard-convert flags, one string: --flags "--init guide"')
    args = ap.parse_args()
    result = profile(str(args.engine / ".venv" / "bin" / "mmrec"), args.source.resolve(), shlex.split(args.flags))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = result
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{args.label}: {result['wall_seconds_under_perf']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU")
    for bucket, share in sorted(result["share_of_cpu_samples_percent"].items(), key=lambda kv: -kv[1]):
        print(f"{share:5.1f} %  {bucket}")


if __name__ == "__main__":
    main()
