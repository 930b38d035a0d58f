"""Pretrain a small LLaMA (transformers) on the pretraining split; save it as a Hugging Face checkpoint
with the tokenizer beside it, ready for `mmrec shard-convert`.

GPU: bf16 autocast, fused AdamW, packed 512-token windows drawn at random from the token stream (documents
joined with <|endoftext|>, the same joining as `mmrec finetune`). Also reports the LLaMA's own held-out loss
on the eval split, read the way `mmrec finetune` reads it (32 lanes of contiguous text).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmrec.training.data import FileTokenizer, tokenize_documents

LLAMA = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def read_jsonl_gz(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, lanes: int = 32, lane_tokens: int = 2048, window: int = 512) -> float:
    """Mean loss over `lanes` contiguous spans of `lane_tokens` tokens (the first ones of each of `lanes`
    equal slices of the stream), each read as non-overlapping `window`-token windows."""
    model.eval()
    n = ids.numel() - 1
    span = n // lanes
    total, count = 0.0, 0
    for lane in range(lanes):
        start = lane * span
        for begin in range(0, min(lane_tokens, span), window):
            width = min(window, lane_tokens - begin, span - begin)
            x = ids[start + begin:start + begin + width + 1].long().to(DEVICE)[None]
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                logits = model(x[:, :-1]).logits
            total += float(F.cross_entropy(logits.float()[0], x[0, 1:], reduction="sum"))
            count += width
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="directory from prepare_data.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--max-seconds", type=float, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (CPU dry runs)")
    args = parser.parse_args()
    if args.tiny:
        LLAMA.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    import transformers

    torch.manual_seed(args.seed)
    tokenizer = FileTokenizer(args.data / "tokenizer" / "tokenizer.json")
    train = tokenize_documents(read_jsonl_gz(args.data / "pretrain.jsonl.gz"), tokenizer, 8192, args.seed)
    held = tokenize_documents(read_jsonl_gz(args.data / "eval.jsonl.gz"), tokenizer, 8192, None)
    config = transformers.LlamaConfig(**LLAMA)
    model = transformers.LlamaForCausalLM(config).to(DEVICE)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=DEVICE == "cuda")
    warmup = 50
    gen = torch.Generator().manual_seed(args.seed)
    train_gpu = train.long().to(DEVICE)
    offsets = torch.arange(args.seq_len + 1, device=DEVICE)
    log = []
    began = time.perf_counter()
    step = 0
    for step in range(1, args.steps + 1):
        lr = args.lr * (step / warmup if step <= warmup else
                        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch_size,), generator=gen).to(DEVICE)
        window = train_gpu[starts[:, None] + offsets]
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            logits = model(window[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, config.vocab_size), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == 1:
            log.append({"step": step, "loss": loss.item(), "lr": lr, "elapsed_s": time.perf_counter() - began})
            print(f"pretrain step {step} loss {loss.item():.4f} {time.perf_counter() - began:.0f}s", flush=True)
        if time.perf_counter() - began > args.max_seconds:
            print(f"pretrain: time limit after step {step}", flush=True)
            break
    seconds = time.perf_counter() - began
    eval_loss = held_out_loss(model, held)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(args.data / "tokenizer" / name, args.out / name)
    summary = {"parameters": params, "config": LLAMA, "steps": step, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "tokens": step * args.batch_size * args.seq_len,
               "train_tokens_available": int(train.numel()), "seconds": round(seconds, 1), "lr": args.lr,
               "final_train_loss": log[-1]["loss"] if log else None, "held_out_loss": eval_loss,
               "held_out_protocol": "32 lanes x 2048 tokens, 512-token windows", "log": log}
    (args.out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()
