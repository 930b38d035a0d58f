"""Step 1 of the guide: what a source checkpoint is, from headers and config files only.

Each family is one row of declarative data (`FAMILIES`): the names of its embedding, head and MLP
tensors, the config keys that hold each size, and its defaults. Values come from the config when it has
them; otherwise they are derived from tensor shapes and listed in `guessed`. A config that contradicts
the shapes is an error, since every later step trusts these numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

from .sources.catalog import SourceCatalog, SourceError, SourceTensor


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    embedding: str  # normalized tensor names
    head: str
    layer_prefix: str  # layer i's tensors start with f"{layer_prefix}{i}."
    ffn_tensor: str  # in layer 0; gives ffn_dim
    ffn_axis: int  # which axis of ffn_tensor is ffn_dim
    ffn_div: int  # ffn_tensor's axis holds ffn_div * ffn_dim (phi3's fused gate_up)
    q_tensor: str | None  # q rows = heads * head_dim (None: fused, read from config)
    k_tensor: str | None
    keys: dict  # field -> config keys tried in order
    hidden_act: str  # default activation
    gated_mlp: bool
    tied_default: bool
    markers: tuple[str, ...]  # normalized names (layer 0) that identify the family without a config


_LLAMA_KEYS = {"vocab_size": ("vocab_size",), "model_dim": ("hidden_size",),
               "num_layers": ("num_hidden_layers",), "num_heads": ("num_attention_heads",),
               "num_kv_heads": ("num_key_value_heads",), "head_dim": ("head_dim",),
               "ffn_dim": ("intermediate_size",), "hidden_act": ("hidden_act",),
               "norm_eps": ("rms_norm_eps",), "tied_embeddings": ("tie_word_embeddings",)}
_GPT2_KEYS = {"vocab_size": ("vocab_size",), "model_dim": ("n_embd", "hidden_size"),
              "num_layers": ("n_layer", "num_hidden_layers"), "num_heads": ("n_head", "num_attention_heads"),
              "ffn_dim": ("n_inner",), "hidden_act": ("activation_function",),
              "norm_eps": ("layer_norm_epsilon",), "tied_embeddings": ("tie_word_embeddings",)}


def _llama_like(model_type, hidden_act="silu", tied=False, markers=("layers.0.self_attn.q_proj.weight",
                                                                     "layers.0.mlp.gate_proj.weight")):
    return Family(model_type, "embed_tokens.weight", "lm_head.weight", "layers.", "layers.0.mlp.up_proj.weight",
                  0, 1, "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight", _LLAMA_KEYS,
                  hidden_act, True, tied, markers)


FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2", markers=("layers.0.self_attn.q_proj.bias", "layers.0.mlp.gate_proj.weight")),
    "gemma": dataclasses.replace(
        _llama_like("gemma", "gelu_pytorch_tanh", tied=True, markers=()),
        keys={**_LLAMA_KEYS, "hidden_act": ("hidden_activation", "hidden_act")}),
    "phi3": Family("phi3", "embed_tokens.weight", "lm_head.weight", "layers.", "layers.0.mlp.gate_up_proj.weight",
                   0, 2, None, None, _LLAMA_KEYS, "silu", True, False,
                   ("layers.0.self_attn.qkv_proj.weight", "layers.0.mlp.gate_up_proj.weight")),
    "gpt2": Family("gpt2", "wte.weight", "lm_head.weight", "h.", "h.0.mlp.c_fc.weight", 1, 1, None, None,
                   _GPT2_KEYS, "gelu_new", False, True, ("h.0.attn.c_attn.weight",)),
    "gpt_neo": Family("gpt_neo", "wte.weight", "lm_head.weight", "h.", "h.0.mlp.c_fc.weight", 0, 1,
                      "h.0.attn.attention.q_proj.weight", "h.0.attn.attention.k_proj.weight",
                      {**_GPT2_KEYS, "model_dim": ("hidden_size",), "num_layers": ("num_layers",),
                       "num_heads": ("num_heads",), "ffn_dim": ("intermediate_size",)},
                      "gelu_new", False, True, ("h.0.attn.attention.q_proj.weight",)),
    "gpt_neox": Family("gpt_neox", "embed_in.weight", "embed_out.weight", "layers.",
                       "layers.0.mlp.dense_h_to_4h.weight", 0, 1, None, None,
                       {**_LLAMA_KEYS, "num_kv_heads": (), "head_dim": (), "norm_eps": ("layer_norm_eps",)},
                       "gelu", False, False, ("layers.0.attention.query_key_value.weight",)),
    "gptj": Family("gptj", "wte.weight", "lm_head.weight", "h.", "h.0.mlp.fc_in.weight", 0, 1,
                   "h.0.attn.q_proj.weight", "h.0.attn.k_proj.weight", _GPT2_KEYS, "gelu_new", False, False,
                   ("h.0.attn.q_proj.weight", "h.0.mlp.fc_in.weight")),
}
# Meta's own names for the llama family (params.json instead of config.json).
META = Family("llama", "tok_embeddings.weight", "output.weight", "layers.", "layers.0.feed_forward.w1.weight",
              0, 1, "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
              {"vocab_size": ("vocab_size",), "model_dim": ("dim",), "num_layers": ("n_layers",),
               "num_heads": ("n_heads",), "num_kv_heads": ("n_kv_heads",), "norm_eps": ("norm_eps",)},
              "silu", True, False, ())

# Non-parameter buffers some checkpoints carry (causal masks, rotary tables).
_BUFFER_RE = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|masked_bias|rotary_emb\.inv_freq|rope\.freqs)$")


@dataclasses.dataclass
class SourceAnalysis:
    model_type: str
    vocab_size: int
    model_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    tied_embeddings: bool
    dtype: str
    num_parameters: int
    total_bytes: int
    files: list[str]
    layout: str
    guessed: list[str]
    hidden_act: str
    gated_mlp: bool
    norm_eps: float | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def detect_family(catalog: SourceCatalog) -> tuple[Family, bool]:
    """The family and whether it was guessed from tensor names (no usable config)."""
    if catalog.layout == "meta":
        return META, False
    config = catalog.config or {}
    model_type = config.get("model_type")
    if model_type is not None:
        if model_type not in FAMILIES:
            raise SourceError(f"{catalog.root}: model_type '{model_type}' is not a known family "
                              f"({', '.join(FAMILIES)}); describe its tensors in a custom mapping file "
                              "(--mapping-file)")
        return FAMILIES[model_type], False
    names = catalog.tensors
    if "tok_embeddings.weight" in names and "layers.0.attention.wq.weight" in names:
        return META, True  # Meta names in a plain .pth file
    for family in FAMILIES.values():
        if family.markers and all(m in names for m in family.markers):
            return family, True
    raise SourceError(f"{catalog.root}: cannot tell the model family from its tensor names (no config.json "
                      f"with a model_type); describe its tensors in a custom mapping file (--mapping-file)")


def analyze(catalog: SourceCatalog) -> SourceAnalysis:
    family, family_guessed = detect_family(catalog)
    config = catalog.config or {}
    t = catalog.tensors
    where = catalog.root
    guessed: list[str] = ["model_type"] if family_guessed else []

    def need(name: str) -> SourceTensor:
        if name not in t:
            raise SourceError(f"{where}: {family.model_type} checkpoint without tensor '{name}'")
        return t[name]

    def from_config(field: str):
        for key in family.keys.get(field, ()):
            value = config.get(key)
            if value is not None and value != -1:  # Meta writes vocab_size -1 for "see the tokenizer"
                return value
        return None

    def pick(field: str, shape_value, check: bool = True):
        """The config value when present (checked against shapes), else the shape-derived one."""
        value = from_config(field)
        if value is None:
            if shape_value is None:
                raise SourceError(f"{where}: cannot determine {field} (not in the config, not derivable "
                                  "from tensor shapes)")
            guessed.append(field)
            return shape_value
        if check and shape_value is not None and value != shape_value:
            raise SourceError(f"{where}: config says {field} = {value} but the tensors give {shape_value}")
        return value

    emb = need(family.embedding)
    if len(emb.shape) != 2:
        raise SourceError(f"{where}: embedding '{family.embedding}' has shape {list(emb.shape)}, expected 2-D")
    vocab_size = pick("vocab_size", emb.shape[0])
    model_dim = pick("model_dim", emb.shape[1])
    layer_re = re.compile(rf"^{re.escape(family.layer_prefix)}(\d+)\.")
    layer_ids = {int(m.group(1)) for n in t if (m := layer_re.match(n))}
    num_layers = pick("num_layers", max(layer_ids) + 1 if layer_ids else 0)

    ffn = need(family.ffn_tensor)
    ffn_shape = ffn.shape[family.ffn_axis] // family.ffn_div
    ffn_dim = from_config("ffn_dim")
    if ffn_dim is None:
        ffn_dim = ffn_shape
        if not (family.model_type in ("gpt2", "gptj", "gpt_neo") and ffn_shape == 4 * model_dim):
            guessed.append("ffn_dim")  # gpt2-style configs say None for "4 * n_embd": read, not guessed
    elif ffn_dim != ffn_shape:
        raise SourceError(f"{where}: config says ffn_dim = {ffn_dim} but '{family.ffn_tensor}' gives {ffn_shape}")

    # Heads cannot be read off shapes; q/k rows give head_dim * heads once one of them is known.
    q_rows = t[family.q_tensor].shape[0] if family.q_tensor and family.q_tensor in t else model_dim
    k_rows = t[family.k_tensor].shape[0] if family.k_tensor and family.k_tensor in t else q_rows
    num_heads = from_config("num_heads")
    head_dim = from_config("head_dim")
    if num_heads is None:
        head_dim = head_dim or _guess_head_dim(q_rows, k_rows)
        num_heads = max(1, q_rows // head_dim)
        guessed.append("num_heads")
        if from_config("head_dim") is None:
            guessed.append("head_dim")
    elif head_dim is None:
        head_dim = q_rows // num_heads
    num_kv_heads = from_config("num_kv_heads")
    if num_kv_heads is None:
        num_kv_heads = k_rows // head_dim if head_dim else num_heads
        if family.k_tensor and k_rows != q_rows:
            guessed.append("num_kv_heads")

    tied = _tied(catalog, family, config)
    act = from_config("hidden_act") or family.hidden_act
    eps = from_config("norm_eps")

    params, dtypes, total_bytes, seen = 0, Counter(), 0, set()
    for name, st in t.items():
        key = tuple(st.pieces)
        if key in seen:
            continue  # a weight shared by two names (tied storage in a .bin) counts once
        seen.add(key)
        total_bytes += st.nbytes
        if _BUFFER_RE.search(name):
            continue
        params += st.numel
        dtypes[st.dtype] += st.numel
    dtype = dtypes.most_common(1)[0][0] if dtypes else next(iter(t.values())).dtype
    return SourceAnalysis(
        model_type=family.model_type, vocab_size=int(vocab_size), model_dim=int(model_dim),
        num_layers=int(num_layers), num_heads=int(num_heads), num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim), ffn_dim=int(ffn_dim), tied_embeddings=tied, dtype=dtype,
        num_parameters=params, total_bytes=total_bytes, files=[str(f) for f in catalog.files],
        layout=catalog.layout, guessed=guessed, hidden_act=str(act), gated_mlp=family.gated_mlp,
        norm_eps=float(eps) if eps is not None else None)


def _guess_head_dim(q_rows: int, k_rows: int) -> int:
    """Common head sizes (128 for large models, else 64), or the largest power of two dividing q and k."""
    g = math.gcd(q_rows, k_rows)
    if g % 128 == 0 and q_rows >= 1024:
        return 128
    size = 64
    while size > 1 and g % size:
        size //= 2
    return size


def _tied(catalog: SourceCatalog, family: Family, config: dict) -> bool:
    head = catalog.tensors.get(family.head)
    if head is None:
        return True  # no head stored: it is the embedding (transformers omits tied heads)
    if head.pieces == catalog.tensors[family.embedding].pieces:
        return True  # one storage under two names (a torch.save of a tied model)
    value = config.get("tie_word_embeddings") if family is not META else None
    return bool(value) if value is not None else False  # transformers ties a stored head when asked to
