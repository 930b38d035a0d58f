"""Keeping MM-Rec's carried state bounded while training (fine-tuning and distillation alike).

The recurrence multiplies h_{t-1} by (1.1·γ + 0.1 − 0.1·g) (docs/mmrec-v1.md, forward step 3). With γ and g free, that
factor reaches 1.2, and where it stays above 1 the state grows geometrically over a long stream until
gradients (then values) stop being finite; short training windows never see it. The factor is at most 1
for every gate value g exactly when γ ≤ 9/11, so training adds a penalty on γ above that bound: the
model's math is untouched, and a model trained with it keeps |h| bounded over any length.
"""

from __future__ import annotations

import torch
from torch import nn

DECAY_LIMIT = 9 / 11  # 1.1·γ + 0.1 − 0.1·g ≤ 1 for all g ∈ [0, 1] iff γ ≤ 9/11
DECAY_PENALTY_WEIGHT = 10.0


class DecayGuard:
    """Watches the decay γ of the given blocks during forward passes; `penalty()` turns what it saw into a
    loss term (squared excess over DECAY_LIMIT, averaged over positions and summed over channels and blocks)
    and forgets it."""

    def __init__(self, blocks: list[nn.Module], weight: float = DECAY_PENALTY_WEIGHT):
        self.weight = weight
        self._seen: dict[int, dict[str, torch.Tensor]] = {}
        self._handles = []
        for index, block in enumerate(blocks):
            for part in ("W_gamma", "W_context"):
                module = getattr(block.mdi, part)
                self._handles.append(module.register_forward_hook(self._keeper(index, part)))

    def _keeper(self, index: int, part: str):
        def keep(module, args, output):
            if torch.is_grad_enabled():
                self._seen.setdefault(index, {})[part] = output
        return keep

    def penalty(self) -> torch.Tensor | float:
        total = 0.0
        for parts in self._seen.values():
            if len(parts) == 2:
                gamma = torch.sigmoid(parts["W_gamma"].float()) * torch.sigmoid(parts["W_context"].float())
                # mean over positions, sum over channels: one channel over the bound is enough to grow h
                excess = (gamma - DECAY_LIMIT).clamp(min=0).pow(2)
                total = total + excess.reshape(-1, excess.shape[-1]).mean(0).sum()
        self._seen.clear()
        return self.weight * total

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.no_grad()
def max_decay_factor(block: nn.Module, x: torch.Tensor) -> float:
    """The largest bound 1.1·γ + 0.1 of the h-factor the block shows on input x [B, T, D] (a diagnostic;
    the tests use it)."""
    xn = block.norm1(x)
    gamma = block.mdi.decay(block.W_z(xn), block.W_k(xn))
    return float(gamma.max()) * 1.1 + 0.1
