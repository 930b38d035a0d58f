"""The target MMRecConfig: the source's sizes unless --vocab_size, --model_dim, --num_layers, --num_heads
or --ffn_dim override them (docs/conversion.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from mmrec.config import ConfigError, MMRecConfig
from mmrec.messages import short
from mmrec.safetensors_format import CODE_TO_TORCH_NAME, DTYPE_SIZES, TORCH_NAME_TO_CODE

from ..analysis import SourceAnalysis
from .model import PlanError

OVERRIDE_KEYS = ("vocab_size", "model_dim", "num_layers", "num_heads", "ffn_dim")
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_DTYPE_ALIASES = {"bf16": "BF16", "fp16": "F16", "half": "F16", "fp32": "F32", "float": "F32",
                  "f32": "F32", "f16": "F16", "fp64": "F64", "double": "F64", "f64": "F64"}

# source activation -> MM-Rec ffn_act (docs/conversion.md: gelu_new/gelu_pytorch_tanh are the tanh GELU)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def dtype_code(name: str | None) -> str | None:
    """'bfloat16', 'torch.bfloat16', 'bf16', 'BF16' -> 'BF16'; None stays None."""
    if name is None:
        return None
    s = str(name).strip().removeprefix("torch.")
    code = s.upper() if s.upper() in CODE_TO_TORCH_NAME else TORCH_NAME_TO_CODE.get(s.lower()) \
        or _DTYPE_ALIASES.get(s.lower())
    if code is None:
        raise PlanError(f"--dtype: unknown dtype {name!r} (use bfloat16, float16, float32 or float64)")
    return code


def output_dtype(requested: str | None, analysis: SourceAnalysis, catalog) -> str:
    """--dtype, else the source's dtype (the floating dtype holding most bytes when mixed)."""
    code = dtype_code(requested)
    if code is None:
        try:
            code = dtype_code(analysis.dtype)
        except PlanError:
            code = None
        if code not in FLOAT_CODES:
            sizes = Counter()
            for t in catalog.tensors.values():
                if t.dtype in FLOAT_CODES:
                    sizes[t.dtype] += t.nbytes
            code = sizes.most_common(1)[0][0] if sizes else "F32"
    if code not in FLOAT_CODES:
        raise PlanError(f"--dtype: output dtype must be a float type ({', '.join(FLOAT_CODES)}), got {code}")
    return code


# The largest output a plan may describe: 2^50 bytes (1 PiB). The estimate below counts only the
# embedding, head and per-layer matrices, so it is a lower bound of the real output.
MAX_PLANNED_BYTES = 2**50


def check_planned_size(sizes: dict, tied: Any, out_dtype: str, overrides: dict) -> None:
    """Refuse target sizes whose planned output exceeds MAX_PLANNED_BYTES before anything is built from
    them (a graph of 10^20 rows would grow memory until the machine gives up)."""
    try:
        vocab, dim, layers, ffn = (int(sizes[k]) for k in ("vocab_size", "model_dim", "num_layers", "ffn_dim"))
    except (TypeError, ValueError):
        return  # not numbers: the config's own checks say what is wrong
    if min(vocab, dim, layers, ffn) < 1:
        return
    params = vocab * dim * (1 if tied is None or tied else 2) + layers * (4 * dim * dim + 3 * dim * ffn)
    nbytes = params * DTYPE_SIZES.get(out_dtype, 8)
    if nbytes > MAX_PLANNED_BYTES:
        named = [k for k in OVERRIDE_KEYS if k in overrides]
        which = (" (from " + ", ".join(f"--{k} {short(overrides[k])}" for k in named) + ")") if named else ""
        raise PlanError(f"the target would hold at least {short(nbytes)} bytes, over the {MAX_PLANNED_BYTES}-"
                        f"byte (1 PiB) limit for a planned output{which}")


def build_target_config(a: SourceAnalysis, overrides: dict | None, out_dtype: str) -> tuple[MMRecConfig, list[str]]:
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(OVERRIDE_KEYS)
    if unknown:
        raise PlanError(f"unknown target size option(s) {sorted(unknown)}; known: {', '.join(OVERRIDE_KEYS)}")
    warnings: list[str] = []
    sizes = {k: overrides.get(k, getattr(a, k)) for k in OVERRIDE_KEYS}
    for k, v in sizes.items():
        if v is None:
            raise PlanError(f"the source does not tell its {k}; give --{k} to set the target's")
    if "num_heads" not in overrides and sizes["model_dim"] % sizes["num_heads"]:
        raise PlanError(f"the source's {sizes['num_heads']} heads do not divide --model_dim "
                        f"{sizes['model_dim']}; give --num_heads")
    check_planned_size(sizes, tied=a.tied_embeddings, out_dtype=out_dtype, overrides=overrides)
    act_src = (a.hidden_act or "gelu").lower()
    act = ACTIVATIONS.get(act_src)
    if act is None:
        act = "gelu"
        warnings.append(f"source activation {act_src!r} has no MM-Rec counterpart: the target uses gelu")
    tied = a.tied_embeddings
    eps = a.norm_eps
    try:
        config = MMRecConfig(
            vocab_size=int(sizes["vocab_size"]), model_dim=int(sizes["model_dim"]),
            num_layers=int(sizes["num_layers"]), num_heads=int(sizes["num_heads"]),
            ffn_dim=int(sizes["ffn_dim"]), ffn_act=act, ffn_gated=bool(a.gated_mlp),
            tie_word_embeddings=True if tied is None else bool(tied),
            norm_eps=float(eps) if eps is not None else 1e-6,
            dropout=0.0,  # inference and distillation run without it; `mmrec finetune --dropout P` trains with one
            torch_dtype=CODE_TO_TORCH_NAME[out_dtype])
    except ConfigError as exc:
        message = str(exc)  # hint the option named first in the message
        flag = min((k for k in OVERRIDE_KEYS if f"'{k}'" in message), key=lambda k: message.index(f"'{k}'"),
                   default=None)
        raise PlanError(f"{exc}" + (f" (--{flag})" if flag else "")) from None
    return config, warnings
