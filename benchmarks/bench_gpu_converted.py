"""Issue 6, part 5: the *converted* 7B on a GPU.

On the GPU machine: write a synthetic LLaMA-7B (HF layout, bf16), convert it with the engine, then
- load it with MMRecModel.from_pretrained(device="cuda", dtype=bf16) from a cold page cache, against the
  raw read time of the same files (also cold), sampling host RssAnon during the load;
- prefill tokens/s and per-token decode latency (generate's CUDA-graph step) of the loaded model.

    PYTHONPATH=.:benchmarks/work/pylib python benchmarks/bench_gpu_converted.py --work /tmp/gpu7b \
        --out $OUT/gpu_converted_7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_runtime import drop_page_cache, machine_info, raw_read, sync, timed_load  # noqa: E402

from mmrec.streaming.convert import ConvertOptions, convert  # noqa: E402
from mmrec.streaming.graph import SchedulerChoice  # noqa: E402
from mmrec.streaming.synthetic import write_synthetic_llama  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu7b"))
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    result: dict = {"machine": machine_info(device), "preset": args.preset}
    source, output = args.work / "src", args.work / "out"
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        start = time.perf_counter()
        write_synthetic_llama(source, args.preset, "BF16", "5GB")
        result["generate_s"] = time.perf_counter() - start
        drop_page_cache(sorted(source.glob("*.safetensors")))
        report = convert(ConvertOptions(source=source, output=output, quiet=True,
                                        scheduler=SchedulerChoice(threads=args.threads)))
        result["convert"] = report["timings"]
        print("converted:", report["timings"], flush=True)

        files = sorted(output.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in files)
        result["cache_drop"] = drop_page_cache(files)
        raw_s, _ = raw_read(files)
        drop_page_cache(files)
        if os.environ.get("MMREC_PROFILE_LOAD"):  # where a load's time goes (cProfile, top 20)
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            model, load_s, peak, baseline, samples = timed_load(output, device, torch.bfloat16)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
            drop_page_cache(files)
            del model
            torch.cuda.empty_cache()
        model, load_s, peak, baseline, samples = timed_load(output, device, torch.bfloat16)
        result["load"] = {"bytes": total, "files": len(files), "raw_read_s": raw_s,
                          "raw_read_GBps": total / raw_s / 1e9, "load_s": load_s,
                          "load_GBps": total / load_s / 1e9, "load_over_raw_read": load_s / raw_s,
                          "peak_rss_anon_over_baseline_MiB": peak / 2**20, "rss_samples": samples,
                          "parameters": model.num_parameters()}
        print("load:", result["load"], flush=True)

        ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_len), device=device)
        with torch.inference_mode():
            model(ids)  # warm-up (captures the recurrence's chunk graphs)
            times = []
            for _ in range(3):
                sync(device)
                start = time.perf_counter()
                model(ids)
                sync(device)
                times.append(time.perf_counter() - start)
        prefill_s = statistics.median(times)
        prompt = ids[:, :16]
        model.generate(prompt, max_new_tokens=4, temperature=0)  # warm-up, graph capture
        sync(device)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.decode_tokens + 1, temperature=0)
        sync(device)
        with_prefill = time.perf_counter() - start
        sync(device)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, temperature=0)
        sync(device)
        prompt_only = time.perf_counter() - start
        decode_ms = 1e3 * (with_prefill - prompt_only) / args.decode_tokens
        result["speed"] = {"prefill_len": args.prefill_len, "prefill_tokens_per_s": args.prefill_len / prefill_s,
                           "decode_ms_per_token": decode_ms, "dtype": "bfloat16", "batch": 1}
        print("speed:", result["speed"], flush=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
