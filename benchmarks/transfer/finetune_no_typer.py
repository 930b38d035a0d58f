"""`mmrec finetune ARGS` for a machine without typer: the same options (the subset run_experiment.py
uses), the same library call (mmrec.training.finetune.finetune), the summary as JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmrec.training.finetune import FinetuneOptions, finetune


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--data", type=Path, action="append", required=True)
    p.add_argument("--eval-data", type=Path, action="append", default=[])
    p.add_argument("--num-steps", type=int, required=True)
    for name, kind in (("--lr", float), ("--batch-size", int), ("--seq-len", int), ("--warmup-steps", int),
                       ("--dropout", float), ("--eval-every", int), ("--eval-tokens", int), ("--seed", int),
                       ("--threads", int), ("--log-every", int)):
        p.add_argument(name, type=kind)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    every = a.log_every or 50
    options = FinetuneOptions(checkpoint=a.checkpoint, output=a.output, data=a.data, eval_data=a.eval_data,
                              num_steps=a.num_steps, fresh=a.fresh,
                              **{k: v for k, v in dict(lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len,
                                                      warmup_steps=a.warmup_steps, dropout=a.dropout,
                                                      eval_every=a.eval_every, eval_tokens=a.eval_tokens,
                                                      seed=a.seed, threads=a.threads).items() if v is not None})

    def progress(r: dict) -> None:
        if "loss" not in r or r["step"] % every == 0 or "eval_loss" in r:
            print(json.dumps(r), file=sys.stderr, flush=True)

    print(json.dumps(finetune(options, progress=progress), indent=2))


if __name__ == "__main__":
    main()
