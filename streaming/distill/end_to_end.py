"""End-to-end distillation: the whole student against the teacher's next-token distribution.

The teacher's top-k logits were computed by the streamed teacher pass and kept (in memory or on disk), so
the teacher is never whole in memory; the student is whole on its device. Loss: KL(p_teacher || q_student)
over the teacher's top-k tokens, p renormalised over them and q the student's full softmax restricted to
them (the mass outside the top-k is ignored). Each calibration sequence starts from a fresh state, as in
the teacher's pass.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from mmrec.training.device import autocast
from mmrec.training.schedule import guarded_step, lr_at, make_optimizer
from mmrec.training.stability import DecayGuard


def topk_kl(student_logits: torch.Tensor, top_values: torch.Tensor, top_index: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) on the teacher's top-k tokens; shapes [B, T, V], [B, T, k] x2."""
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, top_index.long())
    log_p = F.log_softmax(top_values.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@torch.no_grad()
def heldout_kl(model, ids, top_values, top_index, device, batch: int) -> float:
    was = model.training
    model.eval()
    try:
        total = 0.0
        for a in range(0, ids.shape[0], batch):
            with autocast(device):
                logits, _ = model(ids[a:a + batch].to(device))
            total += float(topk_kl(logits, top_values[a:a + batch].to(device),
                                   top_index[a:a + batch].to(device))) * ids[a:a + batch].shape[0]
        return total / max(1, ids.shape[0])
    finally:
        model.train(was)


def train_end_to_end(model, ids: torch.Tensor, top_values: torch.Tensor, top_index: torch.Tensor, *,
                     steps: int, batch_size: int, lr: float, seed: int, device,
                     report: Callable[[dict], None], grad_clip: float = 1.0) -> dict:
    """AdamW on the top-k KL for `steps` steps over sequences drawn by a seeded generator."""
    model.train()
    for module in model.modules():  # dropout off: the student should match the teacher's eval-mode outputs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = make_optimizer(model, lr, 0.0, device)
    generator = torch.Generator().manual_seed(seed * 7919 + 17)
    guard = DecayGuard(list(model.blocks))
    warmup = max(1, steps // 10)
    losses, skipped, began = [], 0, time.monotonic()
    tokens_per_step = batch_size * ids.shape[1]
    try:
        for step in range(steps):
            picks = torch.randint(0, ids.shape[0], (batch_size,), generator=generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, warmup, steps, lr, 0.1)
            with autocast(device):
                logits, _ = model(ids[picks].to(device))
            loss = topk_kl(logits, top_values[picks].to(device), top_index[picks].to(device))
            total = loss + guard.penalty()
            if not guarded_step(optimizer, total, grad_clip):
                skipped += 1
            losses.append(float(loss.detach()))
            elapsed = time.monotonic() - began
            report({"event": "step", "layer": None, "stage": "e2e", "step": step + 1, "steps": steps,
                    "loss": losses[-1], "tokens_per_s": (step + 1) * tokens_per_step / max(elapsed, 1e-9),
                    "eta_s": elapsed / (step + 1) * (steps - step - 1)})
    finally:
        guard.close()
    model.eval()
    return {"steps": steps, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "skipped_steps": skipped,
            "tokens": steps * tokens_per_step, "seconds": round(time.monotonic() - began, 3)}
