"""Held-out loss: one scoring for every arm of an experiment (any model given as a logits function)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..model import MMRecModel
from .device import autocast
from .errors import DataError

POSITION_BUCKET = 256  # tokens per entry of score_windows' loss_by_position


@torch.no_grad()
def evaluate(model: MMRecModel, ids: torch.Tensor, batch: int, seq_len: int, device: torch.device,
             max_tokens: int | None = None) -> float:
    """Mean next-token loss over held-out tokens: `batch` lanes from a fresh state, read `seq_len` at a time
    with the state carried (so each token sees its lane's whole prefix). Dropout off."""
    ids = ids.long()
    lanes = max(1, min(batch, (ids.numel() - 1) // seq_len))
    lane = (ids.numel() - 1) // lanes
    if max_tokens:
        lane = min(lane, max(1, max_tokens // lanes))
    if lane < 1:
        raise DataError("the evaluation data has fewer than 2 tokens")
    was_training = model.training
    model.eval()
    starts = torch.arange(lanes)[:, None] * lane
    total, count, state = 0.0, 0, None
    try:
        for begin in range(0, lane, seq_len):
            width = min(seq_len, lane - begin)
            window = ids[starts + begin + torch.arange(width + 1)[None, :]].to(device)
            with autocast(device):
                logits, state = model(window[:, :-1], state)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1),
                                   reduction="sum")
            total += float(loss)
            count += window[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def heldout_windows(ids: torch.Tensor, window: int, count: int) -> torch.Tensor:
    """`count` windows of `window + 1` tokens, starts spread evenly over the whole stream (the first at 0,
    the last ending at the stream's end): LongTensor [count, window + 1]. The same arguments give the same
    windows, so every model of an experiment is scored on the same tokens."""
    if window < 1 or count < 1:
        raise ValueError(f"window and count must be at least 1, got {window} and {count}")
    ids = ids.reshape(-1).long()
    room = ids.numel() - window - 1
    if room < 0:
        raise DataError(f"the evaluation data has {ids.numel():,} tokens: too few for one window of "
                        f"{window + 1:,}")
    starts = torch.tensor([round(j * room / max(1, count - 1)) for j in range(count)])
    return ids[starts[:, None] + torch.arange(window + 1)[None, :]]


@torch.no_grad()
def score_windows(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch: int = 8,
                  device: torch.device | str | None = None) -> dict[str, Any]:
    """Next-token loss of `logits_fn(input_ids [B, T]) -> logits [B, T, V]` on `windows` [N, T + 1], each
    window read from its start. `device`: where the inputs go (default: the windows' own).

    Returns {"loss": mean over all N * T predicted tokens, "tokens": N * T, "loss_by_position": mean loss of
    positions 0-255, 256-511, ... of the window}."""
    windows = windows.long()
    if device is not None:
        windows = windows.to(device)
    width = windows.shape[1] - 1
    position_sum = torch.zeros(width, dtype=torch.float64)
    for begin in range(0, windows.shape[0], batch):
        chunk = windows[begin:begin + batch]
        logits = logits_fn(chunk[:, :-1])
        targets = chunk[:, 1:].to(logits.device)  # a logits_fn may move its inputs to its model's device
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="none").view(chunk.shape[0], width)
        position_sum += losses.sum(0).double().cpu()
    count = windows.shape[0]
    by_position = [float(position_sum[i:i + POSITION_BUCKET].sum()) / (count * min(POSITION_BUCKET, width - i))
                   for i in range(0, width, POSITION_BUCKET)]
    return {"loss": float(position_sum.sum()) / (count * width), "tokens": count * width,
            "loss_by_position": by_position}


def mmrec_logits_fn(model: MMRecModel, chunk: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`score_windows`' logits function for an MM-Rec model: each call from a fresh state, fed `chunk` tokens
    at a time with the state carried (all at once when None), eval mode, no grad, under `autocast`."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(device)
        step = chunk or input_ids.shape[1]
        was_training = model.training
        model.eval()
        pieces, state = [], None
        try:
            for begin in range(0, input_ids.shape[1], step):
                with autocast(device):
                    logits, state = model(input_ids[:, begin:begin + step], state)
                pieces.append(logits)
        finally:
            model.train(was_training)
        return torch.cat(pieces, dim=1)

    return logits_fn
