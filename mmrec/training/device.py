"""Where and how training runs: the device, autocast, RNG and recurrent-state snapshots, deferred Ctrl-C."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from ..state import BlockState
from .errors import TrainingError


def resolve_device(name: str | None) -> torch.device:
    """`name` as a torch device (default: cuda if available, else cpu); a TrainingError if it is not there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available here")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA (float32 master weights); plain float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def rng_state() -> dict[str, Any]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def detach_state(state):
    """The recurrent state cut from the graph (truncated backpropagation through time)."""
    return tuple(BlockState(s.h.detach(), s.mem.detach(), s.acc.detach(), s.n) for s in state)


def state_to_dict(state) -> dict[str, Any]:
    return {"h": [s.h.cpu() for s in state], "mem": [s.mem.cpu() for s in state],
            "acc": [s.acc.cpu() for s in state], "n": [int(s.n) for s in state]}


def state_from_dict(data: dict[str, Any], device) -> tuple:
    return tuple(BlockState(h.to(device), m.to(device), a.to(device), n)
                 for h, m, a, n in zip(data["h"], data["mem"], data["acc"], data["n"]))


class DeferredInterrupt:
    """The first Ctrl-C only asks the loop to stop after the step in flight (so the saved state is whole);
    a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
