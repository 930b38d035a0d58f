"""Analysis (docs/conversion.md): what a source checkpoint is, from headers and config files only.

Each family's module in `streaming/families/` declares a `SizeSpec`: the names of its embedding, head and
MLP tensors, the config keys that hold each size, and its defaults. Values come from the config when it has
them; otherwise they are derived from tensor shapes and listed in `guessed`. A config that contradicts
the shapes is an error, since every later step trusts these numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

from mmrec.config import MAX_SIZE_FIELD  # the MM-Rec config's own bound: far above any model
from mmrec.messages import short

from .families import FAMILIES
from .families.base import SizeSpec
from .sources.catalog import SourceCatalog, SourceError, SourceTensor

# Config-less detection tries the name layouts with the most (most specific) markers first.
_BY_MARKERS = sorted(((model_type, spec) for model_type, cls in FAMILIES.items()
                      for spec in (cls.sizes, *cls.other_sizes) if spec.markers),
                     key=lambda item: -len(item[1].markers))

# Source config fields that hold a size: bounded like the MM-Rec config's own (MAX_SIZE_FIELD).
_SIZE_FIELDS = ("vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim")

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

    @classmethod
    def from_dict(cls, data: dict) -> "SourceAnalysis":
        """An analysis read back (a plan's or report's `source` entry); fields it lacks are None."""
        return cls(**{field.name: data.get(field.name) for field in dataclasses.fields(cls)})


def detect_family(catalog: SourceCatalog) -> tuple[str, SizeSpec, bool]:
    """(model_type, where its sizes are, whether it was guessed from tensor names for want of a config)."""
    for model_type, cls in FAMILIES.items():
        if catalog.layout in cls.layouts:
            return model_type, cls.layouts[catalog.layout], False
    config = catalog.config or {}
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise SourceError(f"{_config_file(catalog)}: field 'model_type' must be a string, got "
                          f"{_describe(model_type)}")
    if model_type == "mmrec" or (model_type is None and _looks_like_mmrec(catalog.tensors)):
        where = catalog.root if model_type else catalog.files[0]  # no config.json: a single-file output
        why = "config.json model_type 'mmrec'" if model_type else "MM-Rec tensor names"
        raise SourceError(f"{where}: is already an MM-Rec checkpoint ({why}): already converted, nothing to "
                          "convert; load it with MMRecModel.from_pretrained or check it with `mmrec verify`")
    if model_type is not None:
        if model_type not in FAMILIES:
            raise SourceError(f"{catalog.root}: model_type '{model_type}' is not a known family "
                              f"({', '.join(FAMILIES)}); describe its tensors in a custom mapping file "
                              "(--mapping-file)")
        return model_type, FAMILIES[model_type].sizes, False
    names = catalog.tensors
    for model_type, family in _BY_MARKERS:
        if all(m in names for m in family.markers):
            return model_type, family, True
    raise SourceError(f"{catalog.root}: cannot tell the model family from its tensor names (no config.json "
                      f"with a model_type); describe its tensors in a custom mapping file (--mapping-file)")


def _looks_like_mmrec(names) -> bool:
    """MM-Rec parameter names (mmrec/schema.py), as in a single-file output whose config is in its metadata."""
    return "embedding.weight" in names and "blocks.0.W_q.weight" in names and "blocks.0.mdi.W_g.weight" in names


def analyze(catalog: SourceCatalog) -> SourceAnalysis:
    model_type, family, family_guessed = detect_family(catalog)
    config = catalog.config or {}
    t = catalog.tensors
    where = catalog.root
    guessed: list[str] = ["model_type"] if family_guessed else []

    def need(name: str) -> SourceTensor:
        if name not in t:
            raise SourceError(f"{where}: {model_type} checkpoint without tensor '{name}'")
        return t[name]

    def from_config(field: str):
        for key in family.keys.get(field, ()):
            value = config.get(key)
            if field == "vocab_size" and value == -1:
                continue  # Meta writes vocab_size -1 for "see the tokenizer"
            if value is not None:
                return _checked_field(catalog, field, key, value)
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
        if not (family.ffn_default_4x and ffn_shape == 4 * model_dim):
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
        model_type=model_type, vocab_size=int(vocab_size), model_dim=int(model_dim),
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


def _tied(catalog: SourceCatalog, family: SizeSpec, config: dict) -> bool:
    head = catalog.tensors.get(family.head)
    if head is None:
        return True  # no head stored: it is the embedding (transformers omits tied heads)
    if head.pieces == catalog.tensors[family.embedding].pieces:
        return True  # one storage under two names (a torch.save of a tied model)
    value = config.get("tie_word_embeddings") if family.reads_tie_flag else None
    if value is None:
        return False
    # transformers ties a stored head when asked to
    return _checked_field(catalog, "tied_embeddings", "tie_word_embeddings", value)


def _config_file(catalog: SourceCatalog):
    return catalog.root / ("params.json" if catalog.layout == "meta" else "config.json")


def _describe(value) -> str:
    return f"{type(value).__name__} {short(value, 40)}"


def _checked_field(catalog: SourceCatalog, field: str, key: str, value):
    """The config's value for `field` (read from `key`) when its type and range make sense, else one
    SourceError naming the file and the key: every later step does arithmetic with these values."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if field in _SIZE_FIELDS:
        if not is_int or not 1 <= value <= MAX_SIZE_FIELD:
            problem = f"a whole number from 1 to 2^40, got {_describe(value)}"
        else:
            return value
    elif field == "norm_eps":
        if not is_number or not 0 <= value < math.inf:
            problem = f"a finite number >= 0, got {_describe(value)}"
        else:
            return value
    elif field == "tied_embeddings":
        if not isinstance(value, bool):
            problem = f"true or false, got {_describe(value)}"
        else:
            return value
    elif not isinstance(value, str) or not value:  # hidden_act: a name
        problem = f"a non-empty string, got {_describe(value)}"
    else:
        return value
    raise SourceError(f"{_config_file(catalog)}: field '{key}' must be {problem}")
