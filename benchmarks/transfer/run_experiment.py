"""The whole transfer experiment in one go (made for one GPU run): pretrain -> shard-convert (default and
extended) -> ablation variants -> fine-tune every arm concurrently with the same budget and seed.

    python benchmarks/transfer/run_experiment.py --data DATA --work WORK --deadline 560

Fine-tune arms: (a) converted, default mapping; (b) fresh init of the same config (`--fresh`);
(c) converted, extended mapping; and the ablations of make_variants.py. All arms read the same data in the
same order (same seed) with the same schedule. Every loss log is written step by step, so an arm cut off
by the deadline still leaves its curve.
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


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: list, timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(map(str, args)))
    result = subprocess.run(list(map(str, args)), timeout=timeout, **kw)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(map(str, args))}")
    return result


# `mmrec finetune` is a thin CLI over mmrec.training.finetune.finetune(FinetuneOptions(...)). Where the CLI's
# dependencies are missing (typer needs pydantic, a compiled package), call that function directly: the
# options as JSON in argv[1], the summary as JSON on stdout, the evaluations on stderr.
FINETUNE_CALL = ("import json, sys; from mmrec.training.finetune import FinetuneOptions, finetune; "
                 "print(json.dumps(finetune(FinetuneOptions(**json.loads(sys.argv[1])), progress=lambda r: "
                 "'eval_loss' in r and print(json.dumps(r), file=sys.stderr, flush=True)), indent=2))")


def finetune_command(options: dict, cli: bool) -> list:
    """The command that runs one fine-tune: `mmrec finetune --flag value ...` (cli) or FINETUNE_CALL."""
    if not cli:
        return [PY, "-c", FINETUNE_CALL, json.dumps(options, default=str)]
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            for item in value if isinstance(value, list) else [value]:
                flags += [flag, item]
    return [PY, "-m", "mmrec", "finetune", *flags, "--json"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole run")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--pretrain-seconds", type=float, default=150)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--cli", action="store_true", help="run the mmrec CLI (needs typer); default: the "
                        "functions it calls, for machines without typer")
    parser.add_argument("--arms", default="a,b,c,emb-only,ffn-only,no-att,init-only")
    args = parser.parse_args()
    began = time.monotonic()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    for split in ("finetune", "eval"):
        with gzip.open(args.data / f"{split}.jsonl.gz", "rb") as f:
            (work / f"{split}.jsonl").write_bytes(f.read())

    llama = work / "llama"
    run([PY, HERE / "pretrain.py", "--data", args.data, "--out", llama, "--steps", args.pretrain_steps,
         "--max-seconds", args.pretrain_seconds, *(["--tiny", "--batch-size", 4, "--seq-len", 64] if args.tiny else [])])
    for mapping in ("default", "extended"):
        out = work / f"conv-{mapping}"
        if args.cli:
            result = run([PY, "-m", "mmrec", "shard-convert", "--source", llama, "--output", out, "--mapping",
                          mapping, "--json", "-q"], capture_output=True, text=True)
            report = json.loads(result.stdout)
        else:  # the same call as `mmrec shard-convert --source LLAMA --output OUT --mapping M`, without typer
            from mmrec.streaming.convert import ConvertOptions, convert

            log(f"shard-convert --source {llama} --output {out} --mapping {mapping} (Python API)")
            report = convert(ConvertOptions(source=llama, output=out, mapping=mapping, quiet=True))
        log(f"conv-{mapping}: {report['converted_keys']}/{report['total_keys']} keys, "
            f"{report['transferred_parameter_share']:.1%} of the parameters transferred")
    # An arm is NAME or NAME:SEED (default seed 0); its output is ft-NAME (seed 0) or ft-NAME-sSEED.
    arms = [(spec.partition(":")[0], int(spec.partition(":")[2] or 0)) for spec in args.arms.split(",")]
    variants = sorted({a for a, _ in arms if a not in ("a", "b", "c")})
    if variants:
        run([PY, HERE / "make_variants.py", "--converted", work / "conv-default", "--out", work / "variants",
             "--only", *variants])

    checkpoints = {"a": work / "conv-default", "b": work / "conv-default", "c": work / "conv-extended",
                   **{v: work / "variants" / v for v in variants}}
    common = dict(data=[work / "finetune.jsonl"], eval_data=[work / "eval.jsonl"], num_steps=args.steps,
                  lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                  warmup_steps=max(1, args.steps // 20), dropout=0.0, eval_every=args.eval_every,
                  eval_tokens=args.eval_tokens, threads=2)
    processes = {}
    for name, seed in arms:
        arm = name if seed == 0 else f"{name}-s{seed}"
        options = dict(common, checkpoint=checkpoints[name], output=work / f"ft-{arm}", seed=seed, fresh=name == "b")
        cmd = finetune_command(options, args.cli)
        log("$ " + " ".join(map(str, cmd)))
        processes[arm] = subprocess.Popen(list(map(str, cmd)), stdout=open(work / f"ft-{arm}.json", "w"),
                                          stderr=open(work / f"ft-{arm}.log", "w"))
    limit = began + args.deadline
    while any(p.poll() is None for p in processes.values()) and time.monotonic() < limit:
        time.sleep(2)
    for arm, p in processes.items():
        if p.poll() is None:
            log(f"ft-{arm}: deadline reached, stopping it (its loss log so far is kept)")
            p.terminate()
            p.wait()
        log(f"ft-{arm}: exit {p.returncode}")
    log(f"done in {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
