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
        self._files: dict[int, Path] = {}  # id(tensor) -> its file

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
        tensor = torch.from_numpy(mapped)
        self._files[id(tensor)] = path
        return tensor

    def path_of(self, tensor: torch.Tensor) -> Path:
        """The file behind a spilled tensor."""
        return self._files[id(tensor)]

    def release(self, tensor: torch.Tensor) -> None:
        """Give a tensor's RAM back to the budget, or remove its file (the map lives until the tensor dies)."""
        self.used -= self._in_ram.pop(id(tensor), 0)
        path = self._files.pop(id(tensor), None)
        if path is not None:
            path.unlink(missing_ok=True)
