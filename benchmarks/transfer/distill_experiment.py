"""Does distillation keep what the source knew? (issue 11) One GPU run per phase.

    python benchmarks/transfer/distill_experiment.py --phase prepare  --data DATA --work WORK
    python benchmarks/transfer/distill_experiment.py --phase distill  --data DATA --work WORK --out RESULTS
    python benchmarks/transfer/distill_experiment.py --phase finetune --data DATA --work WORK --out RESULTS

prepare:  pretrain the 26M LLaMA (pretrain.py), convert it with every --init mode (shard-convert's Python API).
distill:  the distillation arms, concurrently (each `mmrec distill` through its Python API), then every arm
          scored by ONE function (mmrec.training.evaluate.score_windows) on the SAME held-out windows:
          512-token windows spread over the whole eval split, and 16,384-token windows for the long-context
          check (loss and max |h| by position).
finetune: the README's 500-step fine-tune from several arms, concurrently, then the same scoring.

kept = (F - X) / (F - S) and mixing recovered = (Z - X) / (Z - S), with F the fresh MM-Rec, S the source
LLaMA and Z the zero-mixer conversion, all on the same windows.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
sys.path.insert(0, str(HERE))
from run_experiment import finetune_command  # noqa: E402  (the fine-tune call both experiments use)

INITS = ("guide", "zero-mixer", "self-attend")
WINDOW, WINDOWS = 512, 64            # short held-out windows (32,768 scored tokens)
LONG_WINDOW, LONG_WINDOWS = 16384, 8  # long-context windows (past the first memory write at 8192)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_split(data: Path, split: str) -> list[str]:
    with gzip.open(data / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# -- arms ----------------------------------------------------------------------------------------------
def distill_arms(tiny: bool) -> dict[str, dict]:
    """name -> DistillOptions fields (besides teacher/student/data/output)."""
    steps = dict(mixer_steps=40, block_steps=60, e2e_steps=150, batch_size=64, seq_len=128)
    if tiny:
        steps = dict(mixer_steps=5, block_steps=5, e2e_steps=5, batch_size=4, seq_len=64)
    one_m = 1_000_000 if not tiny else 20_000
    return {
        "mixer-1M": dict(stages="mixer", tokens=one_m, **steps),
        "block-1M": dict(stages="mixer,block", tokens=one_m, **steps),
        "e2e-1M": dict(stages="e2e", tokens=one_m, **steps),
        "all-1M": dict(stages="mixer,block,e2e", tokens=one_m, **steps),
        "all-max": dict(stages="mixer,block,e2e", tokens=10 * one_m, **steps),  # every calibration token there is
    }


def run_one_distill(args) -> None:
    """Child process: one distillation arm."""
    from mmrec.streaming.distill.run import DistillOptions, distill

    fields = distill_arms(args.tiny)[args.arm]
    out = args.work / f"distill-{args.arm}"
    began = time.monotonic()

    def show(record):
        if record["event"] == "layer":
            log(f"{args.arm}: layer {record['layer']} block MSE {record['block_mse_before']:.4f} -> "
                f"{record['block_mse_after']:.4f} ({time.monotonic() - began:.0f}s)")

    report = distill(DistillOptions(teacher=args.work / "llama", student=args.work / "conv-self-attend",
                                    data=[args.work / "calibration.jsonl"], output=out, device=args.device,
                                    memory_budget="48GB", overwrite=True, **fields), show)
    log(f"{args.arm}: done in {report['seconds']:.0f}s")


def fresh_state_dir(work: Path) -> Path:
    """A checkpoint of the fresh MM-Rec arm (PyTorch default init, seed 0) for scoring."""
    import torch

    from mmrec import MMRecModel
    from mmrec.checkpoint import LazyStateDict

    import shutil

    from mmrec.shards import TOKENIZER_FILES

    out = work / "fresh"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        MMRecModel(LazyStateDict(work / "conv-self-attend").config).save_pretrained(out)
    # the tokenizer too: without it `mmrec finetune` falls back to bytes (run 3's fresh arm did: invalid)
    for name in TOKENIZER_FILES:
        if (work / "conv-self-attend" / name).exists():
            shutil.copyfile(work / "conv-self-attend" / name, out / name)
    return out


# -- scoring -------------------------------------------------------------------------------------------
def score_all(work: Path, arms: dict[str, Path], data: Path, device: str, tiny: bool) -> dict:
    import torch
    import transformers

    from mmrec import MMRecModel
    from mmrec.training.data import FileTokenizer, tokenize_documents
    from mmrec.training.evaluate import heldout_windows, mmrec_logits_fn, score_windows

    tokenizer = FileTokenizer(work / "llama" / "tokenizer.json")
    ids = tokenize_documents(read_split(data, "eval"), tokenizer, 8192, None)
    window, count = (64, 8) if tiny else (WINDOW, WINDOWS)
    long_window, long_count = (256, 2) if tiny else (LONG_WINDOW, LONG_WINDOWS)
    short, long = heldout_windows(ids, window, count), heldout_windows(ids, long_window, long_count)
    results = {"protocol": {"eval_tokens": int(ids.numel()), "short": [count, window], "long": [long_count, long_window]}}
    teacher = transformers.AutoModelForCausalLM.from_pretrained(work / "llama").to(device).eval()

    def teacher_logits(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            return teacher(input_ids=x.to(device)).logits

    results["source"] = {"short": score_windows(teacher_logits, short, batch=16)}
    teacher = None  # free its GPU memory before the students (teacher_logits shares this binding)
    for name, path in arms.items():
        model = MMRecModel.from_pretrained(path, device=device, dtype="float32").eval()
        entry = {"short": score_windows(mmrec_logits_fn(model), short, batch=16)}
        entry["long"] = score_windows(mmrec_logits_fn(model, chunk=512), long, batch=4)
        entry["long"]["max_abs_h_by_chunk"] = max_h_by_chunk(model, long, 512, device)
        results[name] = entry
        log(f"scored {name}: short {entry['short']['loss']:.4f}, long {entry['long']['loss']:.4f}, "
            f"max |h| {max(entry['long']['max_abs_h_by_chunk']):.3g}")
    return results


def max_h_by_chunk(model, windows, chunk: int, device) -> list[float]:
    """Largest |h| over blocks and windows after each `chunk` tokens, the state carried from a fresh start."""
    import torch

    from mmrec.training.device import autocast

    peaks = []
    with torch.no_grad():
        state = None
        x = windows[:, :-1].to(device)
        for begin in range(0, x.shape[1], chunk):
            with autocast(torch.device(device)):
                _, state = model(x[:, begin:begin + chunk], state)
            peaks.append(max(float(s.h.float().abs().max()) for s in state))
    return peaks


def summarise(results: dict, fresh: str = "fresh", zero: str = "conv-zero-mixer") -> dict:
    S, F, Z = results["source"]["short"]["loss"], results[fresh]["short"]["loss"], results[zero]["short"]["loss"]
    table = {}
    for name, entry in results.items():
        if name == "protocol":
            continue
        X = entry["short"]["loss"]
        table[name] = {"loss": X, "kept": (F - X) / (F - S), "mixing_recovered": (Z - X) / (Z - S)}
        if "long" in entry:
            table[name]["long_loss"] = entry["long"]["loss"]
            table[name]["long_max_abs_h"] = max(entry["long"]["max_abs_h_by_chunk"])
            table[name]["long_finite"] = all(v == v and abs(v) != float("inf")
                                             for v in entry["long"]["loss_by_position"])
    return table


# -- phases --------------------------------------------------------------------------------------------
def prepare(args) -> None:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "llama" / "config.json").exists():
        tiny = ["--tiny", "--batch-size", "4", "--seq-len", "64", "--steps", "30"] if args.tiny else []
        subprocess.run([PY, HERE / "pretrain.py", "--data", args.data, "--out", work / "llama", "--steps", "800",
                        "--max-seconds", "120", *tiny], check=True)
    from mmrec.streaming.convert import ConvertOptions, convert

    for init in INITS:
        convert(ConvertOptions(source=work / "llama", output=work / f"conv-{init}", init=init, quiet=True,
                               overwrite=True))
        log(f"converted with --init {init}")
    # calibration text: the teacher's pretraining split and the fine-tuning split (never the eval split)
    write_jsonl(work / "calibration.jsonl", read_split(args.data, "pretrain") + read_split(args.data, "finetune"))
    write_jsonl(work / "finetune.jsonl", read_split(args.data, "finetune"))
    write_jsonl(work / "eval.jsonl", read_split(args.data, "eval"))
    fresh_state_dir(work)


def run_parallel(commands: dict[str, list], work: Path, deadline: float) -> None:
    """Run the commands concurrently; any still running after `deadline` seconds is stopped."""
    procs, limit = {}, time.monotonic() + deadline
    for name, cmd in commands.items():
        log("$ " + " ".join(map(str, cmd)))
        procs[name] = subprocess.Popen(list(map(str, cmd)), stdout=open(work / f"{name}.log", "w"),
                                       stderr=subprocess.STDOUT)
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < limit:
        time.sleep(2)
    for name, p in procs.items():
        if p.poll() is None:
            log(f"{name}: deadline reached, stopping it")
            p.terminate()
        log(f"{name}: exit {p.wait()}")
        print("".join((work / f"{name}.log").read_text().splitlines(keepends=True)[-6:]), flush=True)


def phase_distill(args) -> None:
    base = [PY, __file__, "--data", args.data, "--work", args.work, "--device", args.device,
            *(["--tiny"] if args.tiny else [])]
    chosen = args.arms.split(",") if args.arms else list(distill_arms(args.tiny))
    run_parallel({f"distill-{arm}": [*base, "--arm", arm] for arm in chosen}, args.work, args.deadline)
    arms = {"fresh": args.work / "fresh", **{f"conv-{i}": args.work / f"conv-{i}" for i in INITS}}
    arms.update({f"distill-{a}": args.work / f"distill-{a}" for a in distill_arms(args.tiny)
                 if (args.work / f"distill-{a}" / "distill_report.json").exists()})
    results = score_all(args.work, arms, args.data, args.device, args.tiny)
    reports = {a: json.loads((p / "distill_report.json").read_text()) for a, p in arms.items()
               if (p / "distill_report.json").exists()}
    save(args.out / "distill_results.json", {"scores": results, "summary": summarise(results), "reports": reports})


FT_ARMS = ("fresh", "conv-guide", "conv-self-attend", "distill-all-1M")


def phase_finetune(args) -> None:
    steps = 20 if args.tiny else 500
    commands = {}
    for arm in FT_ARMS:
        checkpoint = args.work / arm
        if not (checkpoint / "config.json").exists():
            continue
        commands[f"ft-{arm}"] = finetune_command(dict(
            checkpoint=checkpoint, output=args.work / f"ft-{arm}", data=[args.work / "finetune.jsonl"],
            eval_data=[args.work / "eval.jsonl"], num_steps=steps, lr=6e-4, batch_size=32 if not args.tiny else 4,
            seq_len=64, warmup_steps=max(1, steps // 20), dropout=0.0, eval_every=50, eval_tokens=65536,
            threads=2, seed=0), cli=False)
    run_parallel(commands, args.work, args.deadline)
    arms = {"fresh": args.work / "fresh", "conv-zero-mixer": args.work / "conv-zero-mixer"}
    arms.update({name: args.work / name for name in commands if (args.work / name / "config.json").exists()})
    results = score_all(args.work, arms, args.data, args.device, args.tiny)
    logs = {}
    for name in commands:
        path = args.work / name / "loss_log.jsonl"
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            logs[name] = {"skipped_steps": sum(1 for r in records if r.get("skipped")),
                          "eval": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
                          "max_abs_h": max((r.get("max_abs_h", 0.0) for r in records), default=None)}
    save(args.out / "finetune_results.json", {"scores": results, "summary": summarise(results), "logs": logs})


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"wrote {path}")
    print(json.dumps(data.get("summary"), indent=1), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("prepare", "distill", "finetune"))
    parser.add_argument("--arm", help="(internal) run one distillation arm")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distill")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a minute-long CPU dry run of every phase")
    parser.add_argument("--arms", help="distill phase: only these arms (comma-separated names)")
    parser.add_argument("--deadline", type=float, default=420, help="seconds for the concurrent runs of a phase")
    args = parser.parse_args()
    if args.arm:
        return run_one_distill(args)
    {"prepare": prepare, "distill": phase_distill, "finetune": phase_finetune}[args.phase](args)


if __name__ == "__main__":
    main()
