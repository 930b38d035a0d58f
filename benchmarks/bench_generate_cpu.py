"""CPU generation speed of MM-Rec against a same-size `transformers` LLaMA, measured in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_generate_cpu.py --label after \
        --before-src /tmp/mmrec-before          # -> benchmarks/results/generate_cpu.json

The MM-Rec model has the shape that `mmrec synth --preset small` + `shard-convert` gives (~23M parameters:
vocab 4096, D 512, 4 layers, 8 heads, gated SiLU FFN 1376, untied head); the LLaMA is a random-init
`LlamaForCausalLM` with the same dimensions (vocab, hidden, intermediate, layers, heads; sdpa attention,
KV cache). Both run on the CPU with the same torch thread count, batch 1, a 16-token prompt, 64 new tokens,
greedy (`temperature=0` / `do_sample=False`).

Per repeat every model is timed twice, in an order rotated between repeats so that load from other
processes falls on all of them alike: `generate(prompt, 64)` (ms/token = time / 64) and `generate(prompt, 1)`
(first token: the prompt's prefill; the old MM-Rec code also ran one unneeded step after the last token);
decode ms/step = (t_64 - t_1) / 63, the 63 steps that follow the first token in both. Best and median over
the repeats, after one warm-up call each. A torch-profiler pass of one MM-Rec `generate` records how many `aten::cat` calls each
generated token costs and their share of the CPU time (the issue's symptom).

`--before-src DIR` adds the runtime as it was before this change, in the same run and with the same
weights: DIR holds an older `mmrec/` package (`git archive <rev> mmrec | tar -x -C DIR`), imported under
another name. `--label` names the key of the JSON the run is stored under ("before" for a run of the old
code alone); keys of other labels already in the file are kept. The "before" entry of
results/generate_cpu.json was measured on the old code alone, run as the `mmrec` package:

    git archive d79cd42 mmrec | tar -x -C /tmp/mmrec-before
    cd /tmp && PYTHONPATH=/tmp/mmrec-before /work/main/.venv/bin/python \
        /work/main/benchmarks/bench_generate_cpu.py --label before --threads 2,1
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import mmrec
from mmrec import MMRecConfig, MMRecModel

SHAPE = dict(vocab_size=4096, model_dim=512, num_layers=4, num_heads=8, ffn_dim=1376)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except (ImportError, OSError):
        pass
    return info


def mmrec_config(package=None) -> MMRecConfig:
    cls = package.MMRecConfig if package is not None else MMRecConfig
    return cls(**SHAPE, ffn_act="silu", ffn_gated=True, tie_word_embeddings=False)


def build_llama(dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["model_dim"],
                      intermediate_size=SHAPE["ffn_dim"], num_hidden_layers=SHAPE["num_layers"],
                      num_attention_heads=SHAPE["num_heads"], num_key_value_heads=SHAPE["num_heads"],
                      tie_word_embeddings=False, max_position_embeddings=4096)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id, gc.do_sample = 0, None, None, False
    return model


def load_before(src: Path):
    """The `mmrec` package under src, imported as `mmrec_before` (relative imports stay inside it)."""
    root = src / "mmrec"
    spec = importlib.util.spec_from_file_location("mmrec_before", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["mmrec_before"] = package
    spec.loader.exec_module(package)
    return package, importlib.import_module("mmrec_before.model")


def generators(models: dict, prompt: torch.Tensor) -> dict:
    """name -> fn(n) generating n new tokens greedily."""
    mask = torch.ones_like(prompt)
    out = {}
    for name, model in models.items():
        if name == "llama":
            out[name] = (lambda n, m=model: m.generate(prompt, attention_mask=mask, max_new_tokens=n,
                                                       min_new_tokens=n, do_sample=False))
        else:
            out[name] = (lambda n, m=model: m.generate(prompt, max_new_tokens=n, temperature=0))
    return out


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def summary(values: list[float]) -> dict:
    return {"best": min(values), "median": statistics.median(values), "all": values}


def profile_cat(fn, new_tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(new_tokens)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    cat = next((e for e in rows if e.key == "aten::cat"), None)
    return {"new_tokens": new_tokens,
            "cat_calls_per_token": (cat.count / new_tokens) if cat else 0.0,
            "cat_share_of_self_cpu": (cat.self_cpu_time_total / total) if cat else 0.0,
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_share": round(e.self_cpu_time_total / total, 4)}
                        for e in rows[:6]]}


def measure(args, models: dict, prompt: torch.Tensor, threads: int) -> dict:
    torch.set_num_threads(threads)
    gens = generators(models, prompt)
    n = args.new_tokens
    with torch.no_grad():
        for fn in gens.values():
            fn(4)  # warm-up
        names = list(gens)
        runs = {name: {"total_s": [], "first_token_s": [], "tokens": None} for name in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t_full, tokens = timed(lambda: gens[name](n))
                t_one, _ = timed(lambda: gens[name](1))
                runs[name]["total_s"].append(t_full)
                runs[name]["first_token_s"].append(t_one)
                assert tokens.shape == (prompt.shape[0], prompt.shape[1] + n), (name, tokens.shape)
                runs[name]["tokens"] = tokens
        profiles = {name: profile_cat(gens[name], 16) for name in names if name != "llama"}
    result = {"threads": threads, "models": {}}
    for name in names:
        tot, pre = runs[name]["total_s"], runs[name]["first_token_s"]
        result["models"][name] = {
            "ms_per_token": summary([t / n * 1e3 for t in tot]),
            "first_token_ms": summary([t * 1e3 for t in pre]),
            "decode_ms_per_step": summary([(a - b) / (n - 1) * 1e3 for a, b in zip(tot, pre)]),
            **({"profile": profiles[name]} if name in profiles else {}),
        }
    if "mmrec_before" in runs:
        result["mmrec_tokens_equal_before"] = bool(torch.equal(runs["mmrec"]["tokens"],
                                                               runs["mmrec_before"]["tokens"]))
    ref = result["models"]["llama"]["ms_per_token"]
    for name in names:
        mine = result["models"][name]["ms_per_token"]
        mine["vs_llama_best"] = mine["best"] / ref["best"]
        mine["vs_llama_median"] = mine["median"] / ref["median"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="after", help="key of the JSON this run is stored under")
    ap.add_argument("--before-src", type=Path, help="a directory holding the old mmrec/ package")
    ap.add_argument("--threads", default="2", help="torch threads, comma separated (each measured)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate_cpu.json")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]

    torch.manual_seed(args.seed)
    models = {"mmrec": MMRecModel(mmrec_config()).to(dtype).eval()}
    if args.before_src is not None:
        package, before_model = load_before(args.before_src)
        old = before_model.MMRecModel(mmrec_config(package)).to(dtype).eval()
        old.load_state_dict(models["mmrec"].state_dict())
        models["mmrec_before"] = old
    models["llama"] = build_llama(dtype, args.seed)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    prompt = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))

    run = {"command": "python " + " ".join(sys.argv), "mmrec_package": str(Path(mmrec.__file__).parent),
           "pythonpath": os.environ.get("PYTHONPATH"), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": machine_info(), "load_avg_start": os.getloadavg(),
           "setup": {"shape": SHAPE, "mmrec": "gated silu FFN, untied head (the synth-small conversion)",
                     "llama": "LlamaForCausalLM, random init, same dims, sdpa, KV cache",
                     "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "greedy": True,
                     "parameters": params},
           "results": []}
    for threads in (int(t) for t in args.threads.split(",")):
        run["results"].append(measure(args, models, prompt, threads))
    run["load_avg_end"] = os.getloadavg()

    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    data[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")

    print(f"# {args.label}: {run['command']}\n")
    print("| threads | model | params | ms/token best | ms/token median | decode ms/step median | "
          "first token ms median | vs LLaMA (median) | cat calls/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in run["results"]:
        for name, m in res["models"].items():
            cat = m.get("profile", {}).get("cat_calls_per_token", "")
            print(f"| {res['threads']} | {name} | {params[name] / 1e6:.1f} M | {m['ms_per_token']['best']:.2f} | "
                  f"{m['ms_per_token']['median']:.2f} | {m['decode_ms_per_step']['median']:.2f} | "
                  f"{m['first_token_ms']['median']:.1f} | {m['ms_per_token']['vs_llama_median']:.2f}x | "
                  f"{cat if cat == '' else f'{cat:.1f}'} |")
        if "mmrec_tokens_equal_before" in res:
            equal = res["mmrec_tokens_equal_before"]
            print(f"\nthreads {res['threads']}: MM-Rec tokens equal before/after: {equal}")
    print(f"\nload average start {run['load_avg_start']}, end {run['load_avg_end']}; wrote {args.out}")


if __name__ == "__main__":
    main()
