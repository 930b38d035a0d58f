"""The sequential core of MM-Rec (docs/mmrec-v1.md "Forward pass", step 3), the only part that runs step by step.

Each step is one fused [B, D] x [D, 2D] product (one addmm giving both gates' h-terms) and a few
elementwise kernels. Those kernels are so small that launching them costs more than running them, so on a
GPU, when no gradient is needed, whole chunks of steps are captured once as CUDA graphs and replayed
(measured on an H100 at the 7B shape: 1.56x the memory-bandwidth floor of the h-weights, against 4.9x
launched step by step; benchmarks/RUNTIME.md). The graphs keep static buffers per (device, dtype, B, D):
one model per process at a time uses them.
"""

from __future__ import annotations

import torch

_RECURRENCE_GRAPH_CHUNK = 64
_recurrence_graphs: dict = {}


def _recurrence_steps(z, decay_mix, bias, w_t, h):
    """Steps of the recurrence with one addmm + 5 elementwise kernels each; bias = [b_block | z_gate]."""
    D = h.shape[-1]
    outputs = []
    for t in range(z.shape[1]):
        gates = torch.sigmoid(torch.addmm(bias[:, t], h, w_t))
        z_t = z[:, t]
        # z (s + 0.1 g) + h (decay_mix - 0.1 g), rearranged to fused multiply-adds
        h = torch.addcmul(torch.addcmul(h * decay_mix[:, t], z_t, gates[:, :D]), gates[:, D:], z_t - h,
                          value=0.1)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


class _RecurrenceGraph:
    """One CUDA graph of _RECURRENCE_GRAPH_CHUNK steps over static buffers, for one (device, dtype, B, D)."""

    def __init__(self, B, D, dtype, device):
        C = _RECURRENCE_GRAPH_CHUNK
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(device):
            def buf(*shape):
                return torch.zeros(*shape, dtype=dtype, device=device)
            self.z, self.decay_mix, self.bias = buf(B, C, D), buf(B, C, D), buf(B, C, 2 * D)
            self.w, self.h = buf(2 * D, D), buf(B, D)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self._body()  # warm-up (cuBLAS handles, workspaces) outside the capture
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._body()

    def _body(self):
        out = _recurrence_steps(self.z, self.decay_mix, self.bias, self.w.t(), self.h)
        self.h.copy_(out[:, -1])  # the next chunk starts from here, with no host work in between
        return out


def recurrence(z: torch.Tensor, decay_mix: torch.Tensor, z_gate: torch.Tensor, w_h: torch.Tensor,
                       b_block: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The sequential core, rearranged so each step is one matmul and a few elementwise ops.

    h_t = z ⊙ s + γ ⊙ h + 0.1((1−g) ⊙ h + g ⊙ z + γ ⊙ h)
        = z ⊙ (s + 0.1 g) + h ⊙ (1.1 γ + 0.1 − 0.1 g)
    decay_mix = 1.1 γ + 0.1 and z_gate = A z + b_mdi are precomputed for all t;
    w_h = [W_g ; C] is [2D, D] so one product gives both gates' h-terms, and with the bias [b_block | z_gate]
    one addmm + one sigmoid give both gates. On a GPU without autograd, whole chunks of 64 steps replay as
    one CUDA graph (the step's kernels are too small to hide their launch cost); the rest runs eagerly.
    """
    B, T, D = z.shape
    bias = torch.cat([b_block.expand_as(z_gate), z_gate], dim=-1)  # [B, T, 2D]
    C = _RECURRENCE_GRAPH_CHUNK
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (z, decay_mix, z_gate, w_h, b_block, h))
    if not z.is_cuda or T < C or needs_grad or torch.cuda.is_current_stream_capturing():
        return _recurrence_steps(z, decay_mix, bias, w_h.t(), h)
    key = (z.device, z.dtype, B, D)
    runner = _recurrence_graphs.get(key)
    if runner is None:
        runner = _recurrence_graphs[key] = _RecurrenceGraph(B, D, z.dtype, z.device)
    out = torch.empty_like(z)
    runner.w.copy_(w_h)
    runner.h.copy_(h)
    full = T - T % C
    for start in range(0, full, C):
        runner.z.copy_(z[:, start:start + C])
        runner.decay_mix.copy_(decay_mix[:, start:start + C])
        runner.bias.copy_(bias[:, start:start + C])
        runner.graph.replay()
        out[:, start:start + C].copy_(runner.out)
    if full < T:
        out[:, full:] = _recurrence_steps(z[:, full:], decay_mix[:, full:], bias[:, full:], w_h.t(),
                                          runner.h.clone())
    return out
