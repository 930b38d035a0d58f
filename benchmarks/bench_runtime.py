"""Speed of the shipped MM-Rec runtime (mmrec/), through its public API only (benchmarks/RUNTIME.md).

    PYTHONPATH=. python benchmarks/bench_runtime.py --device cpu --threads 1 --out benchmarks/results/runtime_cpu.json
    PYTHONPATH=. python benchmarks/bench_runtime.py --device cuda --out $OUT/runtime_cuda.json

Parts (--parts): ``bandwidth`` (2 x bytes / time of a large device copy); ``model`` (per DxL size and dtype:
prefill tokens/s of ``model(ids)``, ms/token of the eager one-token step inside ``model.fused_weights()``, and
ms/token of ``model.generate``, with and without its CUDA graph on a GPU, against the weight-read floor);
``recurrence`` (``mmrec.recurrence.recurrence`` over L layers of [2D, D] weights against T x bytes([2D, D]) /
bandwidth; on a GPU both its inference path, replayed CUDA graphs, and its autograd path, step by step).
Medians after a warm-up, the device synchronized around every timed region. The load helpers at the end
(drop_page_cache, raw_read, timed_load) serve bench_gpu_converted.py, which measures loading.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from mmrec import MMRecConfig, MMRecModel
from mmrec.recurrence import recurrence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call of fn(), synchronized, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)


class RssAnonSampler:
    """`with RssAnonSampler() as s:` samples this process's RssAnon every `interval` s; `s.peak` is the max."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.samples, self._stop = interval, 0, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak, self.samples = max(self.peak, rss_anon_bytes()), self.samples + 1

    def __enter__(self):
        self.peak, self._thread = rss_anon_bytes(), threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cpu_threads_torch": torch.get_num_threads()}
    with open("/proc/cpuinfo") as f:
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def build_model(dim: int, layers: int, vocab: int, device: torch.device, dtype: torch.dtype) -> MMRecModel:
    """Built directly on the device in the target dtype: the host never holds a float32 copy."""
    config = MMRecConfig(vocab_size=vocab, model_dim=dim, num_layers=layers, num_heads=8, ffn_dim=4 * dim,
                         dropout=0.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return MMRecModel(config).eval()
    finally:
        torch.set_default_dtype(previous)


def weight_bytes(model: MMRecModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_s(lambda: dst.copy_(src), device, repeats=10 if device.type == "cuda" else 5)
    return 2 * nbytes / seconds / 1e9


@torch.inference_mode()
def bench_model(dim, layers, dtype, device, args, bandwidth) -> dict:
    model = build_model(dim, layers, args.vocab, device, dtype)
    T, n = args.prefill_len, args.decode_tokens
    ids = torch.randint(0, args.vocab, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    prefill_s = median_s(lambda: model(ids), device, repeats=args.prefill_repeats)

    with model.fused_weights():  # what generate() does: each block's h-weight built once
        logits, state = model(ids)
        token = logits[:, -1:].argmax(-1)

        def steps():
            nonlocal logits, state, token
            for _ in range(n):
                logits, state = model(token, state)
                token = logits[:, -1:].argmax(-1)

        step_ms = 1e3 * median_s(steps, device, repeats=3) / n
    nbytes = weight_bytes(model)
    result = {"model_dim": dim, "num_layers": layers, "dtype": str(dtype).replace("torch.", ""),
              "parameters": model.num_parameters(), "weight_bytes": nbytes, "prefill_len": T,
              "prefill_tokens_per_s": T / prefill_s, "decode_ms_per_token_eager_step": step_ms}
    for graph in ((True, False) if device.type == "cuda" else (False,)):
        # 3 new tokens: the fewest for which generate() captures its CUDA graph, so both calls pay the capture
        one = median_s(lambda: model.generate(ids, 3, cuda_graph=graph), device, repeats=3)
        many = median_s(lambda: model.generate(ids, 3 + n, cuda_graph=graph), device, repeats=3)
        result[f"generate_ms_per_token{'_cuda_graph' if graph else ''}"] = 1e3 * (many - one) / n
    if bandwidth:
        result["weight_read_floor_ms"] = 1e3 * nbytes / (bandwidth * 1e9)
    model = None  # free it before the next size (the lambdas above share this binding)
    gc.collect()
    return result


def bench_recurrence(device: torch.device, args, bandwidth: float) -> dict:
    D, T, L, dtype = args.rec_dim, args.rec_steps, args.rec_layers, DTYPES[args.rec_dtype]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(device=device, dtype=dtype)

    # Realistic magnitudes: decay_mix = 1.1 gamma + 0.1 with gamma in (0, 0.8); weights U(+-1/sqrt(D)).
    layers = [(rnd(1, T, D), (rnd(1, T, D) + 1) * 0.44 + 0.1, rnd(1, T, D), rnd(2 * D, D, scale=D ** -0.5),
               rnd(D, scale=D ** -0.5), rnd(1, D, scale=0.5)) for _ in range(L)]
    floor_step_s = 2 * D * D * layers[0][3].element_size() / (bandwidth * 1e9)
    result = {"D": D, "T": T, "B": 1, "layers": L, "dtype": args.rec_dtype,
              "floor_us_per_step": 1e6 * floor_step_s, "paths": {}}
    paths = {"inference": torch.inference_mode}
    if device.type == "cuda":
        paths["autograd"] = torch.enable_grad
    for name, mode in paths.items():
        with mode():
            for x in layers:
                x[3].requires_grad_(name == "autograd")  # w_h: a gradient is needed -> step by step
            one = median_s(lambda: recurrence(*layers[0]), device, repeats=5, warmup=2)
            every = median_s(lambda: [recurrence(*x) for x in layers], device, repeats=3)
        result["paths"][name] = {"us_per_step": 1e6 * one / T, "ms_all_layers": 1e3 * every,
                                 "ratio_to_floor_one_layer": one / (T * floor_step_s),
                                 "ratio_to_floor_all_layers": every / (L * T * floor_step_s)}
    return result


def drop_page_cache(files: list[Path], system: bool = True) -> str:
    """Drop the page cache: the whole system's if we may (and system=True), else each file's pages."""
    os.sync()
    try:
        if not system:
            raise OSError
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    try:
        for path in files:
            with open(path, "rb") as f:
                os.fdatasync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return "posix_fadvise_dontneed"
    except (OSError, AttributeError):
        return "none (warm cache)"


def raw_read(files: list[Path], chunk: int = 64 * 2**20) -> tuple[float, int]:
    view, total = memoryview(bytearray(chunk)), 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - start, total


def timed_load(directory: Path, device: torch.device, dtype: torch.dtype):
    gc.collect()
    baseline = rss_anon_bytes()
    with RssAnonSampler(0.002) as sampler:
        start = time.perf_counter()
        model = MMRecModel.from_pretrained(directory, device=device, dtype=dtype)
        sync(device)
        seconds = time.perf_counter() - start
    return model, seconds, sampler.peak - baseline, baseline, sampler.samples


def markdown(r: dict) -> str:
    lines = [f"Measured memory bandwidth (copy): {r.get('bandwidth_GBps', 0):.0f} GB/s", ""]
    if r.get("model"):
        lines += ["| D×L | dtype | params | prefill tok/s (T) | decode ms/token, eager step | `generate` ms/token"
                  " | `generate` ms/token, CUDA graph | weight-read floor ms |", "|---|---|---|---|---|---|---|---|"]
        for m in r["model"]:
            graph = m.get("generate_ms_per_token_cuda_graph")
            lines.append(f"| {m['model_dim']}×{m['num_layers']} | {m['dtype']} | {m['parameters'] / 1e9:.2f} B | "
                         f"{m['prefill_tokens_per_s']:.0f} ({m['prefill_len']}) | "
                         f"{m['decode_ms_per_token_eager_step']:.2f} | {m['generate_ms_per_token']:.2f} | "
                         f"{'–' if graph is None else f'{graph:.2f}'} | {m.get('weight_read_floor_ms', 0):.2f} |")
    if rec := r.get("recurrence"):
        lines += ["", f"Recurrence D={rec['D']} T={rec['T']} L={rec['layers']} {rec['dtype']}: floor "
                  f"{rec['floor_us_per_step']:.1f} µs/step", "",
                  "| path | µs/step | ratio (1 layer) | ms, all layers | ratio (all) |", "|---|---|---|---|---|"]
        for name, p in rec["paths"].items():
            lines.append(f"| {name} | {p['us_per_step']:.1f} | {p['ratio_to_floor_one_layer']:.2f}× | "
                         f"{p['ms_all_layers']:.1f} | {p['ratio_to_floor_all_layers']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    for flag, kind, default, text in (
            ("--sizes", str, None, "DxL list; default cpu 512x4,1024x8,2048x12, cuda also 4096x24"),
            ("--dtypes", str, None, "default cpu float32,bfloat16; cuda bfloat16"),
            ("--vocab", int, 32000, "vocabulary size"), ("--prefill-len", int, None, "default cpu 64, cuda 512"),
            ("--prefill-repeats", int, 3, ""), ("--decode-tokens", int, None, "default cpu 8, cuda 64"),
            ("--parts", str, None, "bandwidth,model,recurrence (default: all)"),
            ("--rec-dim", int, None, "default cuda 4096, cpu 512"), ("--rec-steps", int, None, "default --prefill-len"),
            ("--rec-layers", int, None, "default cuda 24, cpu 4"),
            ("--rec-dtype", str, None, "default cuda bfloat16, cpu float32"),
            ("--threads", int, None, "torch.set_num_threads"), ("--out", str, None, "JSON results (default: none)")):
        p.add_argument(flag, type=kind, default=default, help=text)
    a = p.parse_args(argv)
    device, gpu = torch.device(a.device), a.device == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    a.prefill_len = a.prefill_len or (512 if gpu else 64)
    a.decode_tokens = a.decode_tokens or (64 if gpu else 8)
    a.rec_dim, a.rec_layers = a.rec_dim or (4096 if gpu else 512), a.rec_layers or (24 if gpu else 4)
    a.rec_steps, a.rec_dtype = a.rec_steps or a.prefill_len, a.rec_dtype or ("bfloat16" if gpu else "float32")
    sizes = a.sizes or ("512x4,1024x8,2048x12,4096x24" if gpu else "512x4,1024x8,2048x12")
    dtypes = (a.dtypes or ("bfloat16" if gpu else "float32,bfloat16")).split(",")
    parts = (a.parts or "bandwidth,model,recurrence").split(",")
    command = "python benchmarks/bench_runtime.py " + " ".join(argv or sys.argv[1:])
    r: dict = {"device": a.device, "command": command,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(device)}

    def save() -> None:
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(r, indent=2) + "\n")

    bandwidth = None
    if "bandwidth" in parts or "recurrence" in parts or "model" in parts:
        bandwidth = r["bandwidth_GBps"] = bench_bandwidth(device, 2**31 if gpu else 2**30)
        print(f"bandwidth {bandwidth:.0f} GB/s", flush=True)
    if "model" in parts:
        r["model"] = []
        for size in sizes.split(","):
            dim, layers = map(int, size.lower().split("x"))
            for dtype in dtypes:
                r["model"].append(bench_model(dim, layers, DTYPES[dtype], device, a, bandwidth))
                print(r["model"][-1], flush=True)
                save()
    if "recurrence" in parts:
        r["recurrence"] = bench_recurrence(device, a, bandwidth)
        save()
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
