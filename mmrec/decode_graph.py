"""One-token decode steps replayed as a CUDA graph.

A decode step of a large model launches hundreds of tiny kernels; on an H100 at the 7B shape launching
them costs ~3x more than running them (benchmarks/RUNTIME.md: 38 -> 11 ms/token when graphed). The graph
is captured once with static buffers for the input token and the recurrent state, for the common step
that writes no memory; the rare step that completes a memory segment runs eagerly.
"""

from __future__ import annotations

import torch

from .state import BlockState


class DecodeGraph:
    def __init__(self, model, state: tuple[BlockState, ...], batch: int):
        self.model = model
        self.segment = model.config.memory_segment_len
        device = state[0].h.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.h = [s.h.clone() for s in state]
        self.mem = [s.mem.clone() for s in state]
        self.acc = [s.acc.clone() for s in state]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._body()  # warm-up outside the capture (cuBLAS handles, workspaces)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()

    def _body(self) -> torch.Tensor:
        # n=0 with a segment longer than one token: the captured step never writes memory.
        state = tuple(BlockState(h, mem, acc, 0) for h, mem, acc in zip(self.h, self.mem, self.acc))
        logits, new_state = self.model(self.ids, state)
        for i, s in enumerate(new_state):
            self.h[i].copy_(s.h)
            self.acc[i].copy_(s.acc)
        return logits

    def step(self, token: torch.Tensor, state: tuple[BlockState, ...]):
        """Same result as model(token, state)."""
        n = state[0].n
        if n + 1 >= self.segment:  # this step writes memory: run it eagerly
            return self.model(token, state)
        for i, s in enumerate(state):
            for static, value in ((self.h[i], s.h), (self.mem[i], s.mem), (self.acc[i], s.acc)):
                if static.data_ptr() != value.data_ptr():
                    static.copy_(value)
        self.ids.copy_(token)
        self.graph.replay()
        return self.logits, tuple(BlockState(self.h[i], self.mem[i], self.acc[i], n + 1)
                                  for i in range(len(state)))
