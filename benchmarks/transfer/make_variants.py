"""Ablations of the converted model: swap groups of tensors between the converted checkpoint and the
fresh init that `mmrec finetune --fresh --seed S` starts from, to see which transferred parts help.

Groups (default mapping): emb = embedding + lm_head; norms = norm1/norm2/final norm; ffn = ffn.0/ffn.3/
ffn_gate (+ biases); att = multi_mem_attention.W_q/W_o (+ biases), from q_proj/o_proj. Everything else
(W_q/W_k/W_v/W_z/W_g, mdi.*) is new in the conversion and has the conversion's init (Xavier, zero biases).
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch

from mmrec import MMRecModel
from mmrec.shards import TOKENIZER_FILES

GROUPS = {
    "emb": r"^(embedding|lm_head)\.weight$",
    "norms": r"(^|\.)norm[12]?\.weight$",
    "ffn": r"\.(ffn\.0|ffn\.3|ffn_gate)\.",
    "att": r"\.multi_mem_attention\.",
}
# name -> (base, groups taken from the other one)
VARIANTS = {
    "emb-only": ("fresh", ["emb"]),          # fresh model + the converted embeddings/head
    "ffn-only": ("fresh", ["ffn", "norms"]),  # fresh model + the converted MLPs (and norms)
    "no-att": ("converted", ["att"]),         # converted, memory-attention W_q/W_o fresh instead
    "init-only": ("converted", ["emb", "norms", "ffn", "att"]),  # only the conversion's init of new parts
}


def group_of(name: str) -> str | None:
    for group, pattern in GROUPS.items():
        if re.search(pattern, name):
            return group
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--converted", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="parent directory of the variants")
    parser.add_argument("--seed", type=int, default=0, help="(variants are always built with seed 0)")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    converted = MMRecModel.from_pretrained(args.converted, dtype=torch.float32)
    torch.manual_seed(args.seed)
    fresh = MMRecModel(converted.config)  # exactly what `mmrec finetune --fresh --seed S` starts from
    conv_sd, fresh_sd = converted.state_dict(), fresh.state_dict()
    for variant in args.only:
        base, swapped = VARIANTS[variant]
        first, other = (fresh_sd, conv_sd) if base == "fresh" else (conv_sd, fresh_sd)
        model = MMRecModel.on_meta(converted.config)
        state = {name: (other if group_of(name) in swapped else first)[name].clone() for name in conv_sd}
        model.load_state_dict(state, assign=True)
        model.tie_weights()
        out = args.out / variant
        model.save_pretrained(out)
        for name in TOKENIZER_FILES:
            if (args.converted / name).exists():
                shutil.copyfile(args.converted / name, out / name)
        counts = {g: sum(1 for n in conv_sd if group_of(n) == g) for g in GROUPS}
        print(f"{variant}: base {base}, from the other: {swapped} ({counts})", flush=True)


if __name__ == "__main__":
    main()
