"""The learning-rate schedule (linear warmup, cosine decay) and the AdamW optimizer."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(step: int, warmup_steps: int, num_steps: int, lr: float, min_lr_ratio: float) -> float:
    """Learning rate of 0-based `step`: linear warmup to lr, then cosine down to min_lr_ratio * lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, num_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or decay parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def guarded_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> bool:
    """Backward, clip the gradients of what the optimizer trains, and step only when the loss and the
    gradient norm are finite (a non-finite step is skipped, never applied). True when the step was applied."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if params else torch.zeros(())
    if math.isfinite(float(loss.detach())) and math.isfinite(float(norm)):
        optimizer.step()
        return True
    return False
