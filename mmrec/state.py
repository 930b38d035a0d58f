"""The recurrent state MM-Rec carries between calls (`docs/mmrec-v1.md`, "State"), in its own module so
that the model and the CUDA-graph decoder both use it without importing each other."""

from __future__ import annotations

from typing import NamedTuple

import torch


class BlockState(NamedTuple):
    """Recurrent state of one block, carried between calls."""

    h: torch.Tensor  # [B, D] last hidden state of the recurrence
    mem: torch.Tensor  # [B, P, D] the top HDS level (pooled memory slots)
    acc: torch.Tensor  # [B, D] sum of block outputs since the last memory write
    n: int  # tokens since the last memory write


State = tuple  # tuple[BlockState, ...], one per block
