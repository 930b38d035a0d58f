"""Calibration activations ([sequences, T, D] tensors): in memory while they fit the memory budget,
otherwise in memory-mapped files of the work directory, so a large model's activations never have to fit
in RAM (the page cache holds what is in use)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

_NUMPY = {torch.float32: np.float32, torch.int32: np.int32}


class ActivationSpace:
    """Hands out activation tensors: RAM while the total stays within `budget` bytes, files beyond."""

    def __init__(self, directory: Path, budget: int):
        self.directory, self.budget, self.used = Path(directory), budget, 0
        self.spilled: list[str] = []
        self._in_ram: dict[int, int] = {}  # id(tensor) -> bytes

    def tensor(self, name: str, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.used + nbytes <= self.budget:
            self.used += nbytes
            tensor = torch.empty(shape, dtype=dtype)
            self._in_ram[id(tensor)] = nbytes
            return tensor
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.bin"
        mapped = np.memmap(path, dtype=_NUMPY[dtype], mode="w+", shape=shape)
        self.spilled.append(name)
        return torch.from_numpy(mapped)

    def release(self, tensor: torch.Tensor) -> None:
        """Give a RAM tensor's bytes back to the budget (files go with the work directory)."""
        self.used -= self._in_ram.pop(id(tensor), 0)
