"""MM-Rec v1 (docs/mmrec-v1.md): the model, its recurrent state, and generation.

Everything that does not depend on h_{t-1} runs batched over the whole sequence; the only sequential part
is one fused [B, D] x [D, 2D] product per step plus elementwise work, with no host synchronisation.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MMRecConfig
from .recurrence import recurrence
from .state import BlockState, State




def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU()}[name]


class RMSNorm(nn.Module):
    """w * x / (||x|| / sqrt(D) + eps): eps is added to the RMS, outside the root (the spec's form)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half-precision inputs are normalised in float32; float32/float64 stay as they are.
        xf = x.float() if x.element_size() < 4 else x
        rms = xf.pow(2).mean(-1, keepdim=True).sqrt()
        return (self.weight.to(xf.dtype) * (xf / (rms + self.eps))).to(x.dtype)


class MDI(nn.Module):
    """Memory Decay/Integration: the MDI gate weight [A | C] and the two decay MLPs."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.W_g = nn.Linear(2 * dim, dim)
        self.W_gamma = nn.Sequential(nn.Linear(dim, inner), nn.GELU(), nn.Linear(inner, dim))
        self.W_context = nn.Sequential(nn.Linear(dim, inner), nn.GELU(), nn.Linear(inner, dim))

    def decay(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        gamma = torch.sigmoid(self.W_gamma(z)) * torch.sigmoid(self.W_context(k))
        return gamma.clamp(1e-6, 1 - 1e-6)


class MultiMemoryAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.W_q = nn.Linear(dim, dim)
        self.W_o = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """query [B, T, D] (already W_q h + 0.5 q), mem [B, P, D] -> context [B, T, D]."""
        B, T, D = query.shape
        H = self.num_heads
        q = query.view(B, T, H, D // H).transpose(1, 2)  # [B, H, T, dh]
        kv = mem.view(B, mem.shape[1], H, D // H).transpose(1, 2)  # [B, H, P, dh]
        ctx = F.scaled_dot_product_attention(q, kv, kv)  # softmax over the P slots, no mask
        return self.W_o(ctx.transpose(1, 2).reshape(B, T, D))


class MMRecBlock(nn.Module):
    def __init__(self, config: MMRecConfig):
        super().__init__()
        D, F_, I = config.model_dim, config.ffn_dim, config.inner_dim
        self.config = config
        self.W_q, self.W_k, self.W_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.W_z, self.W_g = nn.Linear(D, D), nn.Linear(D, D)
        self.norm1 = RMSNorm(D, config.norm_eps)
        self.norm2 = RMSNorm(D, config.norm_eps)
        self.mdi = MDI(D, I)
        self.multi_mem_attention = MultiMemoryAttention(D, config.num_heads)
        # Sequential indices 0 and 3 are the reference's parameter names.
        self.ffn = nn.Sequential(nn.Linear(D, F_), _activation(config.ffn_act), nn.Dropout(config.dropout),
                                 nn.Linear(F_, D))
        if config.ffn_gated:
            self.ffn_gate = nn.Linear(D, F_)
        self.dropout = nn.Dropout(config.dropout)
        # The fused h-weight [W_g ; C], kept only inside MMRecModel.fused_weights() (see h_weight).
        self._w_h: tuple | None = None

    def _h_sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.W_g.weight, self.mdi.W_g.weight

    @staticmethod
    def _version_of(t: torch.Tensor):
        try:
            return t._version
        except RuntimeError:  # an inference tensor keeps no version counter
            return None

    def cache_h_weight(self) -> None:
        """Build the fused h-weight once and keep it until drop_h_weight(); no autograd graph."""
        sources = self._h_sources()
        with torch.no_grad():
            w_h = self._fuse_h_weight(*sources)
        # Holding the sources keeps their storage alive, so a data_ptr seen again is the same memory.
        self._w_h = (w_h, tuple((s.detach(), s.data_ptr(), self._version_of(s), s.dtype, s.device)
                                for s in sources))

    def drop_h_weight(self) -> None:
        self._w_h = None

    def _fuse_h_weight(self, w_g: torch.Tensor, w_mdi: torch.Tensor) -> torch.Tensor:
        return torch.cat([w_g, w_mdi[:, self.config.model_dim:]], dim=0)

    def h_weight(self) -> torch.Tensor:
        """w_h = [W_g ; C] ([2D, D]): one product gives both gates' h-terms (recurrence.py).

        Concatenating it writes 2 x D x D values, about what a one-token step's recurrence product reads.
        Inside MMRecModel.fused_weights() (which generate() uses) it is built once and reused while both
        source weights are unchanged: same storage, same version counter (in-place updates such as
        optimizer steps and load_state_dict bump it), same dtype and device. When autograd needs it, or a
        source changed, it is concatenated again here.
        """
        sources = self._h_sources()
        cached = self._w_h
        if cached is not None and not (torch.is_grad_enabled() and any(s.requires_grad for s in sources)):
            w_h, keys = cached
            if all(s.data_ptr() == ptr and self._version_of(s) == version and s.dtype == dtype
                   and s.device == device for s, (_, ptr, version, dtype, device) in zip(sources, keys)):
                return w_h
        return self._fuse_h_weight(*sources)

    def initial_state(self, batch: int, device, dtype) -> BlockState:
        D, P = self.config.model_dim, self.config.pooled_slots
        # acc sums up to S block outputs: at least float32, so a bf16 model gives the same memory whether
        # the sequence comes in one call or token by token.
        acc_dtype = torch.promote_types(dtype, torch.float32)
        return BlockState(torch.zeros(batch, D, device=device, dtype=dtype),
                          torch.zeros(batch, P, D, device=device, dtype=dtype),
                          torch.zeros(batch, D, device=device, dtype=acc_dtype), 0)

    def feed_forward(self, u: torch.Tensor) -> torch.Tensor:
        up, act, drop, down = self.ffn
        if self.config.ffn_gated:
            return down(drop(act(self.ffn_gate(u)) * up(u)))
        return down(drop(act(up(u))))

    def forward(self, x: torch.Tensor, state: BlockState) -> tuple[torch.Tensor, BlockState]:
        D, S = self.config.model_dim, self.config.memory_segment_len
        h, mem, acc, n = state
        # 1-2. Everything independent of h_{t-1}, batched over the sequence.
        xn = self.norm1(x)
        q, k, v, z = self.W_q(xn), self.W_k(xn), self.W_v(xn), self.W_z(xn)
        gamma = self.mdi.decay(z, k)
        z_gate = F.linear(z, self.mdi.W_g.weight[:, :D], self.mdi.W_g.bias)
        # 3. The sequential recurrence.
        hs = recurrence(z, gamma * 1.1 + 0.1, z_gate, self.h_weight(), self.W_g.bias, h)
        query = self.multi_mem_attention.W_q(hs) + 0.5 * q
        # 4-6. Memory attention and FFN, batched within each stretch between memory writes.
        outputs, start, T = [], 0, x.shape[1]
        while start < T:
            stop = min(T, start + S - n)
            c = self.multi_mem_attention(query[:, start:stop], mem)
            y = x[:, start:stop] + self.dropout(hs[:, start:stop] + c + 0.1 * v[:, start:stop])
            out = y + self.feed_forward(self.norm2(y))
            outputs.append(out)
            acc = acc + out.sum(dim=1, dtype=acc.dtype)
            n += stop - start
            if n == S:  # memory write: every slot (so every pooled slot) becomes acc / S
                mem = (acc / S).to(mem.dtype).unsqueeze(1).expand_as(mem).contiguous()
                acc, n = torch.zeros_like(acc), 0
            start = stop
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out, BlockState(hs[:, -1].clone(), mem, acc, n)  # clone: don't keep all of hs alive


class MMRecModel(nn.Module):
    def __init__(self, config: MMRecConfig | None = None, **fields):
        """MMRecModel(config), or MMRecModel(vocab_size=..., model_dim=..., ...): the config's fields as
        keywords."""
        super().__init__()
        if config is None:
            config = MMRecConfig(**fields)
        elif fields:
            raise TypeError("give either a config or its fields, not both")
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.model_dim)
        self.blocks = nn.ModuleList(MMRecBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.model_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tied: embedding *is* lm_head's weight (the reference ties them to lm_head's init)."""
        if self.config.tie_word_embeddings:
            self.embedding.weight = self.lm_head.weight

    @classmethod
    def on_meta(cls, config: MMRecConfig) -> "MMRecModel":
        """Build without allocating: every parameter on the meta device."""
        with torch.device("meta"):
            return cls(config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        ref = self.embedding.weight
        return tuple(block.initial_state(batch, device or ref.device, dtype or ref.dtype)
                     for block in self.blocks)

    def forward(self, input_ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """input_ids [B, T] -> (logits [B, T, V], state). Pass the state back to continue the sequence."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        x = self.embedding(input_ids)
        if state is None:
            state = self.initial_state(input_ids.shape[0], x.device, x.dtype)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, block_state = checkpoint(block, x, block_state, use_reentrant=False)
            else:
                x, block_state = block(x, block_state)
            new_state.append(block_state)
        return self.lm_head(self.norm(x)), tuple(new_state)

    @contextlib.contextmanager
    def fused_weights(self):
        """`with model.fused_weights():` each block concatenates its h-weight [W_g ; C] once, not per call.

        For one-token steps (a decode loop: `logits, state = model(token, state)`) that concatenation
        copied 2 x D x D values per block per token; here it is built on entry and reused while its
        source weights are unchanged (a changed weight, or a forward that needs their gradient, falls back
        to concatenating). The fused copies take 2 x D x D values per block until the with-statement
        exits. generate() uses it; nested uses keep the outer one's copies.
        """
        outer = any(block._w_h is not None for block in self.blocks)
        if not outer:
            for block in self.blocks:
                block.cache_h_weight()
        try:
            yield self
        finally:
            if not outer:
                for block in self.blocks:
                    block.drop_h_weight()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 cuda_graph: bool = True) -> torch.Tensor:
        """Continue input_ids [B, T] by max_new_tokens tokens: [B, T + max_new_tokens].

        Greedy (argmax) by default. Sampling only when temperature > 0: softmax(logits / temperature),
        restricted to the top_k most likely tokens when top_k is given, drawn with `generator`; top_k and
        generator are unused when greedy.

        The recurrent state carries the whole prefix, so each new token costs one single-token step, run
        with the blocks' fused weights built once for the call (fused_weights()); on a GPU those steps
        replay as one CUDA graph (cuda_graph=False runs them eagerly).
        """
        was_training = self.training
        self.eval()
        try:
            with self.fused_weights():
                return self._generate(input_ids, max_new_tokens, temperature, top_k, generator, cuda_graph)
        finally:
            self.train(was_training)

    def _generate(self, input_ids, max_new_tokens, temperature, top_k, generator, cuda_graph):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        logits, state = self(input_ids)
        step = self
        if cuda_graph and input_ids.is_cuda and max_new_tokens > 2 and self.config.memory_segment_len > 1:
            from .decode_graph import DecodeGraph

            step = DecodeGraph(self, state, input_ids.shape[0]).step
        tokens = [input_ids]
        for i in range(max_new_tokens):
            next_logits = logits[:, -1].float()
            if temperature is None or temperature <= 0:
                next_token = next_logits.argmax(dim=-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k is not None and top_k < next_logits.shape[-1]:
                    kth = torch.topk(next_logits, top_k, dim=-1).values[:, -1:]
                    next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
                probs = torch.softmax(next_logits, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            tokens.append(next_token)
            if i + 1 < max_new_tokens:  # the last token needs no step after it
                logits, state = step(next_token, state)
        return torch.cat(tokens, dim=1)

    # Checkpoint I/O lives in checkpoint.py; these are the familiar entry points.
    def save_pretrained(self, path, max_shard_size="5GB", dtype=None) -> None:
        from .checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, strict: bool = True) -> "MMRecModel":
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path, device=device, dtype=dtype, strict=strict)
