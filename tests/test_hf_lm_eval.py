"""lm-evaluation-harness (`--model hf`) on a converted MM-Rec, offline, scores equal to our own evaluation."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from mmrec import MMRecModel  # noqa: E402
from mmrec.training.evaluate import evaluate  # noqa: E402
from test_hf_model import converted_checkpoint  # noqa: E402

TEXT = """the cat sat on the mat

the dog ran far and then it was quiet
a cat and a dog in the house and then the dog sat on a mat in the house
it was the zebra
"""

# Runs `python -m mmrec.hf.lm_eval` with every name lookup and connection refused and recorded.
NO_NETWORK = """
import atexit, runpy, socket, sys
attempts = []
def refuse(address):
    attempts.append(str(address))
    raise OSError("network access attempted")
socket.getaddrinfo = lambda host, *args, **kwargs: refuse(host)  # a name lookup comes before any connection
socket.socket.connect = lambda self, address, *args: refuse(address)
socket.socket.connect_ex = lambda self, address, *args: refuse(address)
atexit.register(lambda: print("NETWORK-ATTEMPTS", attempts, file=sys.stderr))
sys.argv = ["mmrec.hf.lm_eval", *sys.argv[1:]]
runpy.run_module("mmrec.hf.lm_eval", run_name="__main__", alter_sys=True)
"""


def our_scores(directory, lines):
    """Per line: the summed log-likelihood of its tokens after a BOS, from mmrec.training.evaluate."""
    from transformers import AutoTokenizer

    model = MMRecModel.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    scores = []
    for line in lines:
        ids = torch.tensor([tokenizer.bos_token_id, *tokenizer.encode(line, add_special_tokens=False)])
        count = ids.numel() - 1
        scores.append(-evaluate(model, ids, batch=1, seq_len=count, device=torch.device("cpu")) * count)
    return scores


def test_lm_eval_cli_offline_matches_our_evaluation(family_models, tmp_path_factory, tmp_path):
    converted = converted_checkpoint(family_models, tmp_path_factory)
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(TEXT)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # an empty cache: nothing to find there either
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, "--model_args", f"pretrained={converted},dtype=float32",
         "--text", str(text_file), "--batch_size", "2", "--device", "cpu", "--log_samples",
         "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NETWORK-ATTEMPTS []" in result.stderr

    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    scores = results["results"]["mmrec_text"]
    samples = [json.loads(line) for line in next((tmp_path / "results").rglob("samples_*.jsonl")).open()]
    samples.sort(key=lambda s: s["doc_id"])
    lines = [line for line in TEXT.splitlines() if line.strip()]
    assert [s["doc"]["text"] for s in samples] == lines  # one document per non-blank line

    ours = our_scores(converted, lines)
    theirs = [float(s["filtered_resps"][0]) for s in samples]
    assert theirs == pytest.approx(ours, rel=1e-5)
    words = sum(len(re.split(r"\s+", line)) for line in lines)
    byte_count = sum(len(line.encode()) for line in lines)
    assert scores["word_perplexity,none"] == pytest.approx(math.exp(-sum(ours) / words), rel=1e-5)
    assert scores["byte_perplexity,none"] == pytest.approx(math.exp(-sum(ours) / byte_count), rel=1e-5)
