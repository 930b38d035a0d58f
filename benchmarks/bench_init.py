"""How fast converter-made values are generated, per core: `conversion_init` of xavier-uniform rows into a
reused bf16 buffer, one thread (torch and numpy single-threaded), best of --repeat.

    .venv/bin/python benchmarks/bench_init.py                    # this engine
    /path/to/other/checkout/.venv/bin/python benchmarks/bench_init.py --label before   # another engine

Each run adds its numbers under its label to benchmarks/results/init_rate.json. Older engines whose
`conversion_init` has no `out=` allocate each block instead (measured as they are).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "init_rate.json"


def measure(shape: tuple[int, int], block_rows: int, repeat: int) -> float:
    import torch

    from mmrec.init import conversion_init

    torch.set_num_threads(1)
    takes_out = "out" in inspect.signature(conversion_init).parameters
    buffer = torch.empty(block_rows * shape[1], dtype=torch.bfloat16)
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for first in range(0, shape[0], block_rows):
            last = min(shape[0], first + block_rows)
            kwargs = {"out": buffer[:(last - first) * shape[1]]} if takes_out else {}
            conversion_init("blocks.0.W_z.weight", shape, 0, first, last, rule="xavier_uniform",
                            dtype=torch.bfloat16, **kwargs)
        seconds = time.perf_counter() - start
        best = max(best, shape[0] * shape[1] * 2 / seconds)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="this engine")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    shape, block_rows = (8192, 8192), 2048  # 128 MiB of bf16, in 32 MiB blocks (a write task's blocks)
    rate = measure(shape, block_rows, args.repeat)
    import mmrec.init

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = {"bf16_bytes_per_second_one_core": rate, "shape": list(shape),
                           "block_rows": block_rows, "repeat": args.repeat,
                           "init_format": getattr(mmrec.init, "INIT_FORMAT", 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{args.label}: {rate / 1e9:.2f} GB/s of bf16 values per core")


if __name__ == "__main__":
    main()
