"""mmrec.training.evaluate: held-out windows over the whole stream, scored the same way for any model."""

from __future__ import annotations

import math

import pytest
import torch

from mmrec import MMRecConfig, MMRecModel
from mmrec.training.errors import DataError
from mmrec.training.evaluate import heldout_windows, mmrec_logits_fn, score_windows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = MMRecConfig(vocab_size=61, model_dim=32, num_layers=2, num_heads=4, ffn_dim=48, memory_slots=32,
                         hds_levels=3, memory_segment_len=5, dropout=0.0)
    return MMRecModel(config)


def test_windows_cover_the_stream_ends_evenly():
    ids = torch.arange(1000, dtype=torch.int32)
    windows = heldout_windows(ids, window=63, count=5)
    assert windows.shape == (5, 64) and windows.dtype == torch.long
    starts = windows[:, 0].tolist()
    assert starts[0] == 0 and windows[-1, -1] == 999  # the first window starts the stream, the last ends it
    assert starts == [round(j * (1000 - 64) / 4) for j in range(5)]
    assert all(torch.equal(w, torch.arange(s, s + 64)) for w, s in zip(windows, starts))
    assert torch.equal(windows, heldout_windows(ids, window=63, count=5))  # the same for every arm
    assert heldout_windows(ids, window=63, count=1)[0, 0] == 0
    with pytest.raises(DataError):
        heldout_windows(torch.arange(10), window=10, count=2)


def test_loss_is_the_cross_entropy_of_every_window_token():
    torch.manual_seed(1)
    vocab = 7
    table = torch.randn(vocab, vocab)

    def logits_fn(input_ids):  # a bigram model: the next token's logits depend on this one only
        return table[input_ids]

    windows = heldout_windows(torch.randint(0, vocab, (2000,)), window=300, count=3)
    result = score_windows(logits_fn, windows, batch=2)
    losses = [[-torch.log_softmax(table[w[t]], -1)[w[t + 1]].item() for t in range(300)] for w in windows]
    assert result["tokens"] == 900
    assert result["loss"] == pytest.approx(sum(map(sum, losses)) / 900, rel=1e-5)
    assert len(result["loss_by_position"]) == 2  # positions 0-255 and 256-299
    assert result["loss_by_position"][0] == pytest.approx(sum(sum(l[:256]) for l in losses) / (3 * 256), rel=1e-5)
    assert result["loss_by_position"][1] == pytest.approx(sum(sum(l[256:]) for l in losses) / (3 * 44), rel=1e-5)


def test_mmrec_model_scored_whole_and_in_chunks(model):
    windows = heldout_windows(torch.randint(0, 61, (500,), generator=torch.Generator().manual_seed(2)), 40, 4)
    model.train()
    whole = score_windows(mmrec_logits_fn(model), windows, batch=3)
    chunked = score_windows(mmrec_logits_fn(model, chunk=7), windows, batch=3)
    assert model.training  # the mode is restored
    assert math.isfinite(whole["loss"]) and whole["tokens"] == 160
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    inputs = windows[:, :-1]
    assert torch.allclose(mmrec_logits_fn(model, chunk=7)(inputs), mmrec_logits_fn(model)(inputs), atol=1e-5)
    with torch.no_grad():
        logits, _ = model.eval()(windows[:, :-1])
    model.train()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), windows[:, 1:].reshape(-1))
    assert whole["loss"] == pytest.approx(float(expected), rel=1e-5)
    # Each call starts from a fresh state: scoring again gives the same number.
    assert score_windows(mmrec_logits_fn(model, chunk=7), windows, batch=3)["loss"] == chunked["loss"]
