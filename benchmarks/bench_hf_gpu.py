"""A converted MM-Rec through transformers on a GPU (docs/hf.md).

For each model directory: load it with AutoModelForCausalLM.from_pretrained(dir, torch_dtype=bfloat16,
device_map="auto"), generate greedily through transformers (the recurrent state as its cache), and record
tokens/s, peak GPU memory, the model's forward calls (one for the prompt, then one per new token) and
whether the tokens equal the runtime's own MMRecModel.generate on the same prompt.

Models: `--model DIR` (a converted directory, e.g. carried from a CPU machine) and, with
`--synthetic-dim`, a larger random MM-Rec written here in the same layout by the runtime's save_pretrained
(the GPU machine has no dask, so it cannot run the converter).

    PYTHONPATH=. python benchmarks/bench_hf_gpu.py --model DIR --synthetic-dim 2048 --out hf_gpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import mmrec.hf  # noqa: F401  registers model_type "mmrec" with the Auto classes
import transformers
from mmrec import MMRecConfig, MMRecModel
from transformers import AutoModelForCausalLM

GIB = 2 ** 30


def synchronized_seconds(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def write_synthetic(directory: Path, dim: int, layers: int, vocab: int) -> None:
    """A random bf16 MM-Rec (PyTorch's default init, seed 0) saved in the converter's layout."""
    config = MMRecConfig(vocab_size=vocab, model_dim=dim, num_layers=layers, num_heads=16, ffn_dim=dim * 8 // 3,
                         ffn_act="silu", ffn_gated=True, dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MMRecModel(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="2GB")
    del model
    torch.cuda.empty_cache()


def short_segment_copy(directory: Path, work: Path, segment: int) -> Path:
    """The same files with config.json's memory_segment_len changed."""
    out = work / f"{directory.name}_segment{segment}"
    shutil.copytree(directory, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "memory_segment_len": segment}))
    return out


def bench(directory: Path, prompt_len: int, new_tokens: int) -> dict:
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()  # anything an earlier model left (nothing, normally)
    torch.cuda.reset_peak_memory_stats()
    model, load_s = synchronized_seconds(lambda: AutoModelForCausalLM.from_pretrained(
        directory, torch_dtype=torch.bfloat16, device_map="auto"))
    weights_gib = (torch.cuda.memory_allocated() - baseline) / GIB
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(model.device)
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=8, **options)  # warm-up: cuBLAS handles, recurrence graphs
    lengths: list[int] = []
    # Counted at the wrapper: a one-token step on the GPU replays a CUDA graph, past the runtime's forward.
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[-1]),
                                           with_kwargs=True)
    torch.cuda.reset_peak_memory_stats()
    out, hf_s = synchronized_seconds(lambda: model.generate(prompt, max_new_tokens=new_tokens, **options))
    hook.remove()
    hf_peak = (torch.cuda.max_memory_allocated() - baseline) / GIB

    runtime = MMRecModel.from_pretrained(directory, device=model.device, dtype=torch.bfloat16)
    runtime.generate(prompt, 8)  # warm-up (its decode steps replay as a CUDA graph)
    ref, runtime_s = synchronized_seconds(lambda: runtime.generate(prompt, new_tokens))
    return {
        "directory": directory.name, "parameters": sum(p.numel() for p in model.parameters()),
        "config": {k: getattr(model.config, k) for k in ("vocab_size", "model_dim", "num_layers", "ffn_dim",
                                                         "memory_segment_len")},
        "dtype": str(model.dtype), "device": str(model.device), "prompt_tokens": prompt_len,
        "new_tokens": new_tokens, "load_seconds": round(load_s, 3), "weights_gib": round(weights_gib, 3),
        "transformers_generate": {"seconds": round(hf_s, 4), "new_tokens_per_second": round(new_tokens / hf_s, 1),
                                  "peak_gpu_gib": round(hf_peak, 3),
                                  "forward_calls": len(lengths), "first_call_tokens": lengths[0],
                                  "later_calls_all_one_token": all(n == 1 for n in lengths[1:])},
        "runtime_generate": {"seconds": round(runtime_s, 4),
                             "new_tokens_per_second": round(new_tokens / runtime_s, 1)},
        "tokens_match_runtime": bool(torch.equal(out, ref)),
        "distinct_new_tokens": len(set(out[0, prompt_len:].tolist())),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, action="append", default=[], help="a converted directory (repeatable)")
    ap.add_argument("--synthetic-dim", type=int, default=0, help="also a random MM-Rec of this model_dim")
    ap.add_argument("--synthetic-layers", type=int, default=16)
    ap.add_argument("--synthetic-vocab", type=int, default=32000)
    ap.add_argument("--short-segment", type=int, default=0,
                    help="also each --model with this memory_segment_len: decoding crosses memory writes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/hf_gpu"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    directories = list(args.model)
    if args.short_segment:
        directories += [short_segment_copy(d, args.work, args.short_segment) for d in args.model]
    if args.synthetic_dim:
        synthetic = args.work / f"synthetic_d{args.synthetic_dim}_l{args.synthetic_layers}"
        write_synthetic(synthetic, args.synthetic_dim, args.synthetic_layers, args.synthetic_vocab)
        directories.append(synthetic)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "models": []}
    for directory in directories:
        results["models"].append(bench(directory, args.prompt_len, args.new_tokens))
        print(json.dumps(results["models"][-1], indent=2), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
