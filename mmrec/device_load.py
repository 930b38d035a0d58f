"""Stream checkpoint tensors from disk to a GPU at disk speed.

Page-faulting a memory map and copying each tensor from pageable memory serialises the disk and the copy
(measured on an H100: 1.73x the raw read time of the files). Here each tensor's bytes are read with
`preadv` into one of two small pinned buffers while the previous buffer's bytes are copied to the device
asynchronously, so reading and copying overlap; host memory stays at the two buffers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .safetensors_format import TensorSpan, torch_dtype

CHUNK_BYTES = 32 << 20


class PinnedStreamer:
    def __init__(self, device: torch.device, chunk_bytes: int | None = None):
        self.device = device
        self.chunk = chunk_bytes or CHUNK_BYTES
        self.buffers = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done = [None, None]  # event: the buffer's last copy has finished and it may be refilled
        self.stream = torch.cuda.Stream(device)
        self.turn = 0
        self.fds: dict[Path, int] = {}

    def load(self, file: Path, span: TensorSpan) -> torch.Tensor:
        """The tensor on the device; its bytes may still be in flight until `finish()`."""
        out = torch.empty(span.shape, dtype=torch_dtype(span.dtype), device=self.device)
        if span.nbytes:
            self._stream_bytes(file, span.start, span.nbytes, out.view(-1).view(torch.uint8))
        return out

    def load_file(self, file: Path, header) -> dict[str, torch.Tensor]:
        """Every tensor of a safetensors file, as views of one device allocation filled in one sequential
        pass: no per-tensor allocation or read (hundreds of large cudaMallocs cost seconds)."""
        data_bytes = header.file_size - header.data_start
        flat = torch.empty(data_bytes, dtype=torch.uint8, device=self.device)
        self._stream_bytes(file, header.data_start, data_bytes, flat)
        out = {}
        for name, span in header.tensors.items():
            piece = flat[span.start - header.data_start:span.end - header.data_start]
            out[name] = piece.view(torch_dtype(span.dtype)).view(span.shape)
        return out

    def _stream_bytes(self, file: Path, start: int, nbytes: int, target: torch.Tensor) -> None:
        fd = self.fds.get(file)
        if fd is None:
            fd = self.fds[file] = os.open(file, os.O_RDONLY)
        position = 0
        while position < nbytes:
            count = min(self.chunk, nbytes - position)
            i, self.turn = self.turn, self.turn ^ 1
            if self.done[i] is not None:
                self.done[i].synchronize()
            buffer = self.buffers[i]
            _pread_into(fd, memoryview(buffer.numpy())[:count], start + position, file)
            with torch.cuda.stream(self.stream):
                target[position:position + count].copy_(buffer[:count], non_blocking=True)
                self.done[i] = torch.cuda.Event()
                self.done[i].record(self.stream)
            position += count

    def finish(self) -> None:
        """Wait for every copy; then the loaded tensors may be used on any stream."""
        self.stream.synchronize()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _pread_into(fd: int, view: memoryview, offset: int, file: Path) -> None:
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"{file}: ends before byte {offset + len(view)}")
        view, offset = view[got:], offset + got
