"""MMRecConfig: the fields of docs/mmrec-v1.md "Config", their defaults and their checks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .messages import short

FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
# Largest size field a config may hold: far above any real model, small enough that nothing derived from it
# (4**(hds_levels-1), products of sizes) is slow or absurd. A 5000-digit integer is refused, not computed with.
MAX_SIZE_FIELD = 2 ** 40
MAX_HDS_LEVELS = 16
ARCHITECTURES = ("MMRecForCausalLM",)  # transformers' class name for config.json (mmrec/hf)


class ConfigError(ValueError):
    """An impossible or missing configuration value; the message names the field."""


@dataclasses.dataclass
class MMRecConfig:
    vocab_size: int
    model_dim: int = 4096
    num_layers: int = 24
    num_heads: int = 8
    ffn_dim: int | None = None  # None -> 4 * model_dim
    inner_dim: int | None = None  # None -> model_dim // 4
    ffn_act: str = "gelu"
    ffn_gated: bool = False
    memory_slots: int = 1024
    hds_levels: int = 3
    memory_segment_len: int = 8192
    dropout: float = 0.1
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    torch_dtype: str | None = None  # dtype the checkpoint is stored in, e.g. "bfloat16"
    # Fields we do not know are kept (and written back) but otherwise ignored.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.model_dim if isinstance(self.model_dim, int) else None
        if self.inner_dim is None:
            self.inner_dim = self.model_dim // 4 if isinstance(self.model_dim, int) else None
        self.validate()

    # --- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def pooled_slots(self) -> int:
        """P: slots of the top HDS level, each the mean of 4**(levels-1) memory slots."""
        return self.memory_slots // 4 ** (self.hds_levels - 1)

    # --- checks --------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "model_dim", "num_layers", "num_heads", "ffn_dim", "inner_dim",
                     "memory_slots", "hds_levels", "memory_segment_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {short(value)}")
            if value > MAX_SIZE_FIELD:
                raise ConfigError(f"config field '{name}' is {short(value)}, over the limit of {MAX_SIZE_FIELD}")
        if self.hds_levels > MAX_HDS_LEVELS:
            raise ConfigError(f"config field 'hds_levels' must be at most {MAX_HDS_LEVELS}, got {self.hds_levels}")
        if self.model_dim % self.num_heads:
            raise ConfigError(f"config field 'num_heads' ({self.num_heads}) must divide "
                              f"'model_dim' ({self.model_dim})")
        if self.ffn_act not in FFN_ACTIVATIONS:
            raise ConfigError(f"config field 'ffn_act' must be one of {', '.join(FFN_ACTIVATIONS)}; "
                              f"got {self.ffn_act!r}")
        if self.memory_slots % 4 ** (self.hds_levels - 1):
            raise ConfigError(f"config field 'memory_slots' ({self.memory_slots}) must be divisible by "
                              f"4**(hds_levels-1) = {4 ** (self.hds_levels - 1)}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config field 'dropout' must be in [0, 1), got {short(self.dropout)}")
        if not _is_number(self.norm_eps) or not 0 <= self.norm_eps < math.inf:
            raise ConfigError(f"config field 'norm_eps' must be a finite number >= 0, got {short(self.norm_eps)}")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(f"config field 'torch_dtype' must be a string, got {short(self.torch_dtype)}")
        for name in ("ffn_gated", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field '{name}' must be true or false, "
                                  f"got {getattr(self, name)!r}")

    # --- config.json -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        # `architectures` names the transformers class (mmrec.hf) that loads this config.json with
        # AutoModelForCausalLM; a value read from the file (kept in `extra`) wins.
        out = {"model_type": "mmrec", "architectures": list(ARCHITECTURES), **self.extra}
        for field in dataclasses.fields(self):
            if field.name != "extra":
                out[field.name] = getattr(self, field.name)
        if out["torch_dtype"] is None:
            del out["torch_dtype"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MMRecConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        if data.get("model_type", "mmrec") != "mmrec":
            raise ConfigError(f"config field 'model_type' must be 'mmrec', got {data['model_type']!r}")
        if "vocab_size" not in data:
            raise ConfigError("config field 'vocab_size' is required")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "model_type"}
        if extra.get("architectures") == list(ARCHITECTURES):  # the default: to_dict() writes it again
            del extra["architectures"]
        return cls(**kwargs, extra=extra)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MMRecConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc})") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit integer, nesting too deep
            raise ConfigError(f"{path}: invalid JSON ({str(exc)[:120] or 'nested too deeply'})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
