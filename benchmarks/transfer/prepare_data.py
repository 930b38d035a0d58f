"""Build the transfer experiment's text splits and tokenizer (CPU, offline, deterministic).

Text: the `.py` files of this machine's Python standard library (tests and site-packages left out) and the
827 WikiText-2 paragraphs of a JSONL sample (`--wikitext`, one {"text": ...} per line; the default path is
the project workspace's, outside this repository). Every file / paragraph goes to exactly
one split, chosen by a hash of its name (files) or its index (paragraphs):

    pretrain  ~75% of the Python files + 60% of the paragraphs   (the LLaMA's pretraining)
    finetune  ~20% of the Python files + 25% of the paragraphs   (held out from pretraining)
    eval       ~5% of the Python files + 15% of the paragraphs   (held out from both)

Tokenizer: byte-level BPE, 8192 tokens, trained on the pretraining split only, with <|endoftext|> as EOS.
Writes OUT/{pretrain,finetune,eval}.jsonl.gz, OUT/tokenizer/{tokenizer.json,tokenizer_config.json} and
OUT/manifest.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parents[2] / "shared" / "data" / "wikitext-2-sample.jsonl"


def bucket(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def python_files(lib: Path) -> list[Path]:
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--wikitext", type=Path, default=WIKITEXT, help="WikiText-2 paragraphs, JSONL")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[str]] = {"pretrain": [], "finetune": [], "eval": []}
    sources: dict[str, dict[str, int]] = {s: {"python_files": 0, "wikitext_paragraphs": 0} for s in splits}
    for path in python_files(lib):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip() or len(text) > 400_000:
            continue
        b = bucket(str(path.relative_to(lib)))
        split = "pretrain" if b < 0.75 else "finetune" if b < 0.95 else "eval"
        splits[split].append(text)
        sources[split]["python_files"] += 1
    paragraphs = [json.loads(line)["text"] for line in args.wikitext.read_text().splitlines() if line.strip()]
    for i, text in enumerate(paragraphs):
        f = i / len(paragraphs)
        split = "pretrain" if f < 0.60 else "finetune" if f < 0.85 else "eval"
        splits[split].append(text)
        sources[split]["wikitext_paragraphs"] += 1
    for split, docs in splits.items():
        with gzip.open(args.out / f"{split}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(splits["pretrain"], trainer)
    tok_dir = args.out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "model_max_length": 1024}, indent=2) + "\n")
    counts = {s: sum(len(e.ids) for e in tokenizer.encode_batch(docs)) for s, docs in splits.items()}
    manifest = {"python_stdlib": str(lib), "wikitext": args.wikitext.name, "vocab_size": tokenizer.get_vocab_size(),
                "documents": {s: len(d) for s, d in splits.items()}, "sources": sources,
                "characters": {s: sum(map(len, d)) for s, d in splits.items()}, "tokens": counts}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
