"""MMRecForCausalLM: transformers' PreTrainedModel + GenerationMixin around the runtime's MMRecModel.

The math is mmrec.model's, unchanged: this class holds an MMRecModel as `self.model` and only translates
between transformers' calling conventions (input_ids / labels / cache / ModelOutput) and the runtime's
`logits, state = model(ids, state)`. The recurrent state is the generation cache, so each new token costs one
single-token step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..model import MMRecModel
from .configuration import MMRecConfig


class MMRecCache:
    """The recurrent state (one BlockState per block) as transformers' generation cache.

    Unlike a key/value cache it does not grow: it holds the whole prefix in O(1) memory per block. It is
    updated in place by each forward that receives it, like transformers' DynamicCache.
    """

    is_compileable = False
    is_croppable = False  # a recurrent state cannot be rolled back to an earlier position

    def __init__(self):
        self.state = None
        self.seen_tokens = 0
        self.decode_graph = None  # on a GPU: the runtime's one-token step, captured once (decode_graph.py)

    @property
    def is_linear(self) -> list[bool]:
        # False: generate() may then slice the prompt by get_seq_length() when a cache is passed back in.
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update(self, state, new_tokens: int) -> None:
        self.state = state
        self.seen_tokens += new_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search)."""
        if self.state is not None:
            self.state = tuple(s._replace(h=s.h.index_select(0, beam_idx.to(s.h.device)),
                                          mem=s.mem.index_select(0, beam_idx.to(s.mem.device)),
                                          acc=s.acc.index_select(0, beam_idx.to(s.acc.device)))
                               for s in self.state)


@dataclass
class MMRecCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: MMRecCache | None = None


class MMRecPreTrainedModel(PreTrainedModel):
    config_class = MMRecConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MMRecBlock"]
    _is_stateful = True  # transformers refuses assisted generation (it needs to roll a cache back)

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the runtime modules initialise themselves (a fresh model gets PyTorch's defaults), and a
        loaded checkpoint must keep its values."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own MMRecCache on the first forward


class MMRecForCausalLM(MMRecPreTrainedModel, GenerationMixin):
    def __init__(self, config: MMRecConfig, runtime: MMRecModel | None = None):
        """A fresh model from `config`, or a wrapper around an already loaded runtime model."""
        super().__init__(config)
        self.model = runtime if runtime is not None else MMRecModel(config.to_runtime())
        self.post_init()

    # -- what transformers and PEFT look up -------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def tie_weights(self, *args, **kwargs) -> None:
        self.model.tie_weights()  # the runtime's rule: embedding *is* lm_head's weight when tied

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: MMRecCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> MMRecCausalLMOutput:
        """input_ids [B, T] continue `cache` (a fresh state when None). `labels` are shifted inside, as in
        every transformers causal LM (-100 is ignored). Logits come back in float32."""
        if inputs_embeds is not None:
            raise NotImplementedError("MM-Rec takes input_ids only (inputs_embeds is not supported)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise NotImplementedError("MM-Rec returns logits only (no hidden states; it has no attention weights)")
        self._check_adapters()
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        state = cache.state if cache is not None else None
        if state is None and attention_mask is not None:
            _check_no_left_padding(attention_mask)
        logits, new_state = self._run(input_ids, cache)
        if use_cache or cache is not None:
            cache = cache if cache is not None else MMRecCache()
            cache.update(new_state, input_ids.shape[-1])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].to(logits.device).reshape(-1), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        output = MMRecCausalLMOutput(loss=loss, logits=logits.float(), cache=cache)
        return output if return_dict is not False else output.to_tuple()

    def _run(self, input_ids: torch.Tensor, cache: MMRecCache | None):
        """The runtime's forward; a one-token step on a GPU without autograd replays the runtime's CUDA
        graph (what MMRecModel.generate does): eager, a step launches hundreds of tiny kernels."""
        state = cache.state if cache is not None else None
        graphable = (state is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1 and input_ids.is_cuda
                     and not self.training and not torch.is_grad_enabled()
                     and self.model.config.memory_segment_len > 1)
        if not graphable:
            return self.model(input_ids, state)
        if cache.decode_graph is None:  # captured once per cache, i.e. once per generate() call
            from ..decode_graph import DecodeGraph

            cache.decode_graph = DecodeGraph(self.model, state, input_ids.shape[0])
        return cache.decode_graph.step(input_ids, state)

    def _check_adapters(self) -> None:
        """The recurrence reads W_g's and mdi.W_g's weights directly (one fused product per step), so an
        adapter wrapped around either would be silently skipped: refuse it instead."""
        for i, block in enumerate(self.model.blocks):
            for name, module in (("W_g", block.W_g), ("mdi.W_g", block.mdi.W_g)):
                if type(module) is not nn.Linear:
                    raise NotImplementedError(
                        f"blocks.{i}.{name} is wrapped ({type(module).__name__}): the recurrence reads that "
                        "weight directly, so an adapter there would be ignored; leave W_g out of target_modules")

    # -- generation ----------------------------------------------------------------------------------------
    def _reorder_cache(self, cache: MMRecCache, beam_idx: torch.LongTensor) -> MMRecCache:
        cache.reorder_cache(beam_idx)
        return cache

    # -- files: the converter's layout, read and written by mmrec.checkpoint -------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "MMRecForCausalLM":
        from .loading import load_converted

        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args!r}")
        return load_converted(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, max_shard_size="5GB", **kwargs) -> None:
        """Write the converter's layout (config.json + safetensors shards) with mmrec.checkpoint, plus
        generation_config.json, so the runtime and this class both load the result."""
        from ..checkpoint import save_pretrained

        save_pretrained(self.model, save_directory, max_shard_size=max_shard_size)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)


def _check_no_left_padding(attention_mask: torch.Tensor) -> None:
    """A recurrent model has no attention mask: padding after the text is harmless for a causal model (it
    only follows the real tokens), padding before it would run through the state. One check per prompt."""
    mask = attention_mask.bool()
    if mask.dim() == 2 and mask.shape[1] > 1 and bool((~mask[:, :-1] & mask[:, 1:]).any()):
        raise ValueError("MM-Rec cannot skip padding before a sequence (it would enter the recurrent state): "
                         "pad on the right, or run sequences of different lengths one at a time")
