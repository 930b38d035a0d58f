"""Layer-wise alignment of one MM-Rec block with its teacher layer, on the teacher's own hidden states.

Two stages, each a short AdamW run on calibration sequences drawn by a seeded generator:
- `mixer`: the block's token mixer (everything but the FFN and norm2) learns to add to the residual stream
  what the teacher's attention adds: target = the attention branch's output, prediction = y − x where
  y = x + h + c + 0.1·v is the input of norm2;
- `block`: the whole block learns the teacher layer's output.
Losses are relative MSEs (divided by the target's mean square), so layers of any scale read alike. The
decay penalty of mmrec.training.stability keeps the carried state bounded over streams longer than T.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import nn

from mmrec.training.schedule import guarded_step, lr_at, make_optimizer
from mmrec.training.stability import DecayGuard

FFN_PARTS = ("ffn.", "ffn_gate.", "norm2.")


@dataclasses.dataclass(frozen=True)
class LayerwiseSettings:
    steps: dict[str, int]  # stage -> optimizer steps
    batch_size: int
    lr: float
    seed: int
    grad_clip: float = 1.0


class MixerTap:
    """Captures y (the input of norm2) during a block's forward pass: the mixer's output is y − x."""

    def __init__(self, block: nn.Module):
        self.y = None
        self.handle = block.norm2.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.y = args[0]

    def close(self) -> None:
        self.handle.remove()


def _prediction(stage: str, block: nn.Module, tap: MixerTap, x: torch.Tensor) -> torch.Tensor:
    out, _ = block(x, block.initial_state(x.shape[0], x.device, x.dtype))
    return tap.y - x if stage == "mixer" else out


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)


@torch.no_grad()
def stage_error(stage: str, block: nn.Module, x: torch.Tensor, target: torch.Tensor, device,
                batch: int) -> float:
    """Relative MSE of a stage's prediction over held-out sequences (x, target: [N, T, D] on the host)."""
    tap = MixerTap(block)
    try:
        num = den = 0.0
        for a in range(0, x.shape[0], batch):
            xb, tb = x[a:a + batch].to(device), target[a:a + batch].to(device)
            pred = _prediction(stage, block, tap, xb)
            num += float((pred - tb).pow(2).sum())
            den += float(tb.pow(2).sum())
        return num / max(den, 1e-12)
    finally:
        tap.close()


def train_stage(stage: str, block: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: int,
                settings: LayerwiseSettings, device, report: Callable[[dict], None]) -> dict:
    """Train `block` for one stage on (x, target) [N, T, D] host tensors; returns the stage's numbers."""
    steps = settings.steps.get(stage, 0)
    if steps <= 0:
        return {"steps": 0}
    for name, param in block.named_parameters():  # the mixer stage leaves the FFN (copied from the source) as is
        param.requires_grad_(stage == "block" or not name.startswith(FFN_PARTS))
    optimizer = make_optimizer(block, settings.lr, 0.0, device)
    generator = torch.Generator().manual_seed(_stage_seed(settings.seed, layer, stage))
    tap, guard = MixerTap(block), DecayGuard([block])
    warmup = max(1, steps // 10)
    losses, skipped, began = [], 0, time.monotonic()
    tokens_per_step = settings.batch_size * x.shape[1]
    try:
        for step in range(steps):
            picks = torch.randint(0, x.shape[0], (settings.batch_size,), generator=generator)
            xb, tb = x[picks].to(device), target[picks].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, warmup, steps, settings.lr, 0.1)
            loss = relative_mse(_prediction(stage, block, tap, xb), tb)
            total = loss + guard.penalty()
            if not guarded_step(optimizer, total, settings.grad_clip):
                skipped += 1
            losses.append(float(loss.detach()))
            elapsed = time.monotonic() - began
            report({"event": "step", "layer": layer, "stage": stage, "step": step + 1, "steps": steps,
                    "loss": losses[-1], "tokens_per_s": (step + 1) * tokens_per_step / max(elapsed, 1e-9),
                    "eta_s": elapsed / (step + 1) * (steps - step - 1)})
    finally:
        tap.close()
        guard.close()
        for param in block.parameters():
            param.requires_grad_(True)
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "skipped_steps": skipped,
            "tokens": steps * tokens_per_step, "seconds": round(time.monotonic() - began, 3)}


def _stage_seed(seed: int, layer: int, stage: str) -> int:
    return (seed * 1_000_003 + layer * 101 + (0 if stage == "mixer" else 1)) % (2 ** 63)
