"""MMRecConfig for transformers: the same config.json fields as mmrec.config.MMRecConfig (the runtime's)."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .. import config as runtime_config

# The runtime config's model fields (torch_dtype travels as transformers' `dtype`).
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(runtime_config.MMRecConfig)
                       if f.name not in ("extra", "torch_dtype"))


class MMRecConfig(PretrainedConfig):
    """transformers' view of an MM-Rec config.json. The sizes keep the runtime's names (model_dim,
    num_layers, ...); the usual transformers names (hidden_size, ...) are aliases, read by tools such as
    PEFT and lm-evaluation-harness. `to_runtime()` gives the runtime config, checked field by field."""

    model_type = "mmrec"
    attribute_map = {"hidden_size": "model_dim", "num_hidden_layers": "num_layers",
                     "num_attention_heads": "num_heads", "intermediate_size": "ffn_dim"}

    def __init__(self, vocab_size=None, model_dim=4096, num_layers=24, num_heads=8, ffn_dim=None, inner_dim=None,
                 ffn_act="gelu", ffn_gated=False, memory_slots=1024, hds_levels=3, memory_segment_len=8192,
                 dropout=0.1, norm_eps=1e-6, tie_word_embeddings=True, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.model_dim = model_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ffn_dim = ffn_dim
        self.inner_dim = inner_dim
        self.ffn_act = ffn_act
        self.ffn_gated = ffn_gated
        self.memory_slots = memory_slots
        self.hds_levels = hds_levels
        self.memory_segment_len = memory_segment_len
        self.dropout = dropout
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        kwargs.setdefault("architectures", ["MMRecForCausalLM"])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if vocab_size is not None:  # transformers builds a default config first; a real one is checked here
            resolved = self.to_runtime()
            self.ffn_dim, self.inner_dim = resolved.ffn_dim, resolved.inner_dim

    def to_runtime(self) -> runtime_config.MMRecConfig:
        """The runtime's MMRecConfig (raises mmrec.ConfigError naming a bad field)."""
        fields = {name: getattr(self, name) for name in RUNTIME_FIELDS}
        # `dtype` in transformers 5 (reading `torch_dtype` there only warns); a plain attribute before.
        dtype = getattr(self, "dtype", None) or self.__dict__.get("torch_dtype")
        if dtype is not None:
            fields["torch_dtype"] = str(dtype).replace("torch.", "")
        return runtime_config.MMRecConfig(**fields)

    @classmethod
    def from_runtime(cls, config: runtime_config.MMRecConfig, **kwargs) -> "MMRecConfig":
        data = config.to_dict()
        data.pop("model_type")
        return cls(**data, **kwargs)
