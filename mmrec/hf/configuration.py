"""MMRecConfig for transformers: the same config.json fields as mmrec.config.MMRecConfig (the runtime's)."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .. import config as runtime_config

# The runtime config's model fields (torch_dtype travels as transformers' `dtype`).
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(runtime_config.MMRecConfig)
                       if f.name not in ("extra", "torch_dtype"))
# Their defaults are the runtime's, read from it, so the two configs cannot drift apart.
_RUNTIME_DEFAULTS = {f.name: None if f.default is dataclasses.MISSING else f.default
                     for f in dataclasses.fields(runtime_config.MMRecConfig) if f.name in RUNTIME_FIELDS}


class MMRecConfig(PretrainedConfig):
    """transformers' view of an MM-Rec config.json. The sizes keep the runtime's names (model_dim,
    num_layers, ...); the usual transformers names (hidden_size, ...) are aliases, read by tools such as
    PEFT and lm-evaluation-harness. `to_runtime()` gives the runtime config, checked field by field."""

    model_type = "mmrec"
    attribute_map = {"hidden_size": "model_dim", "num_hidden_layers": "num_layers",
                     "num_attention_heads": "num_heads", "intermediate_size": "ffn_dim"}

    def __init__(self, use_cache: bool = True, **kwargs):
        """The runtime config's fields with the runtime's own defaults (vocab_size: None until given)."""
        for name in RUNTIME_FIELDS:
            if name != "tie_word_embeddings":  # transformers' own __init__ sets that one
                setattr(self, name, kwargs.pop(name, _RUNTIME_DEFAULTS[name]))
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", _RUNTIME_DEFAULTS["tie_word_embeddings"])
        kwargs.setdefault("architectures", ["MMRecForCausalLM"])
        super().__init__(**kwargs)
        if self.vocab_size is not None:  # transformers builds a default config first; a real one is checked here
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
