"""Read a multi-GB sharded bf16 checkpoint through SourceCatalog.read and measure anonymous memory.

    python benchmarks/bench_read_sources.py --size-gb 4 [--work-dir DIR] [--block-mb 64] [--drop-caches]

1. Writes a llama-shaped bf16 checkpoint (sharded safetensors + index + config.json) into the work dir,
   shard by shard from one reused random buffer: never the whole model in memory. Reused if present.
2. Starts a child process that imports torch and the engine, reports ready, then reads every tensor once
   in row blocks of about --block-mb (touching every byte with a sum).
3. Samples the child's RssAnon (/proc/<pid>/status) every ~2 ms; reports the peak minus the baseline
   taken after the child's imports (file-backed mmap pages are page cache, not RssAnon), and throughput.
Results are printed and written as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import rss_anon  # noqa: E402  (shared with bench_convert)


def llama_shape(size_gb: float) -> dict:
    """A llama-7B-like width; layers chosen to reach about size_gb of bf16."""
    d, f, vocab, kv = 2048, 5632, 32000, 2048
    per_layer = (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) * 2
    fixed = (2 * vocab * d + d) * 2
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return {"hidden_size": d, "intermediate_size": f, "vocab_size": vocab, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": kv // 128, "head_dim": 128}


def tensor_list(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def generate(work: Path, size_gb: float, shard_gb: float) -> dict:
    """Write the checkpoint shard by shard; returns its config. Skips work already done."""
    import numpy as np

    from mmrec.safetensors_format import layout_header

    cfg = llama_shape(size_gb)
    marker = work / "bench_done.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        return cfg
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.safetensors"):
        old.unlink()
    tensors = tensor_list(cfg)
    shards, current, size = [], [], 0
    for name, shape in tensors:  # group tensors into shards of about shard_gb
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > shard_gb * 1e9:
            shards.append(current)
            current, size = [], 0
        current.append((name, "BF16", shape))
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal(8 << 20, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    weight_map = {}
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, spans = layout_header(entries, {"format": "pt"})
        total = max(end for _, end in spans.values()) - len(header)
        with open(work / fname, "wb") as f:
            f.write(header)
            while total > 0:
                n = min(total, len(chunk))
                f.write(chunk[:n])
                total -= n
        weight_map.update({name: fname for name, _, _ in entries})
    (work / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (work / "config.json").write_text(json.dumps({"model_type": "llama", "rms_norm_eps": 1e-5,
                                                  "tie_word_embeddings": False, "hidden_act": "silu", **cfg}))
    marker.write_text(json.dumps(cfg))
    return cfg


def child(source: str, block_mb: float) -> None:
    """Import, say READY, wait for GO, read every tensor in row blocks, print a JSON result."""
    import torch

    from mmrec.streaming.sources import open_source

    catalog = open_source(source)
    print("READY", flush=True)
    sys.stdin.readline()
    start, total, acc = time.perf_counter(), 0, 0.0
    for name, t in catalog.tensors.items():
        rows = t.shape[0] if t.shape else 1
        row_bytes = max(1, t.nbytes // max(rows, 1))
        step = max(1, int(block_mb * 1e6 // row_bytes))
        for s in range(0, rows, step):
            block = catalog.read(name, s, min(rows, s + step))
            # Touch every byte without an upcast copy (a sum would allocate a wider copy of the block).
            acc += int(block.reshape(-1).view(torch.uint8).max())
            total += block.numel() * block.element_size()
            del block
    seconds = time.perf_counter() - start
    print(json.dumps({"bytes": total, "seconds": seconds, "checksum": acc}), flush=True)


def measure(source: Path, block_mb: float) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(source), "--block-mb", str(block_mb)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(0.05)
    baseline = rss_anon(proc.pid)
    peak, samples = baseline, 0
    proc.stdin.write("GO\n")
    proc.stdin.flush()
    while proc.poll() is None:
        value = rss_anon(proc.pid)
        if value is not None:
            peak = max(peak, value)
            samples += 1
        time.sleep(0.002)
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    if proc.returncode:
        raise SystemExit(f"child failed with exit code {proc.returncode}")
    return {**result, "baseline_rss_anon": baseline, "peak_rss_anon": peak,
            "peak_minus_baseline": peak - baseline, "samples": samples,
            "throughput_mb_s": result["bytes"] / 1e6 / result["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--block-mb", type=float, default=64)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/mmrec-bench-read-sources"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "read_sources.json")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache first (root only)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.block_mb)

    t = time.perf_counter()
    cfg = generate(args.work_dir, args.size_gb, args.shard_gb)
    gen_s = time.perf_counter() - t
    if args.drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    r = measure(args.work_dir, args.block_mb)
    result = {"benchmark": "read_sources", "size_gb": args.size_gb, "block_mb": args.block_mb,
              "layers": cfg["num_hidden_layers"], "generate_s": round(gen_s, 2), "cold_cache": args.drop_caches,
              **r}
    mib = 1 << 20
    print(f"read {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.2f} s ({r['throughput_mb_s']:.0f} MB/s), "
          f"block {args.block_mb} MB; RssAnon baseline {r['baseline_rss_anon'] / mib:.1f} MiB, "
          f"peak {r['peak_rss_anon'] / mib:.1f} MiB, peak - baseline {r['peak_minus_baseline'] / mib:.1f} MiB "
          f"({r['samples']} samples)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
