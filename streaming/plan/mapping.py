"""Mapping tables (target pattern -> source role), user mapping files, and ModelWeightConverter (the subclassable
converter of the Python API).

A table maps a target pattern ('{i}' = target layer) to a family role ("q", "up", ...) or to an explicit
source pattern ('{i}' = the source layer the layer map assigns). The converter resolves a pattern to a
catalog name through `_keys_match`, which a subclass may override (the extension point, docs/conversion.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

from mmrec.messages import short

from .model import PlanError


@dataclasses.dataclass(frozen=True)
class MapEntry:
    target: str                       # target pattern, '{i}' = target layer
    role: str | None = None           # a family role (families/base.py)
    source: str | None = None         # or an explicit source pattern, '{i}' = source layer
    transforms: tuple[dict, ...] = ()  # applied after the role's own transforms
    repeat_kv: bool = False           # grouped-query k/v heads are repeated up to the target's rows
    score: float | None = None        # a user file may state the score itself

    @property
    def is_new(self) -> bool:
        return self.role is None and self.source is None


def _entries(pairs: Iterable[tuple[str, str]], repeat: Iterable[str] = ()) -> dict[str, MapEntry]:
    repeat = set(repeat)
    return {t: MapEntry(t, role=r, repeat_kv=r in repeat) for t, r in pairs}


_B = "blocks.{i}."
_KV_ROLES = ("k", "v", "k_bias", "v_bias")

# The default table (docs/conversion.md "The mapping tables"), per role.
DEFAULT_TABLE = _entries([
    ("embedding.weight", "embed"),
    *[(_B + t, r) for t, r in [
        ("norm1.weight", "attn_norm"), ("norm2.weight", "mlp_norm"),
        ("multi_mem_attention.W_q.weight", "q"), ("multi_mem_attention.W_q.bias", "q_bias"),
        ("multi_mem_attention.W_o.weight", "o"), ("multi_mem_attention.W_o.bias", "o_bias"),
        ("ffn.0.weight", "up"), ("ffn.0.bias", "up_bias"),
        ("ffn.3.weight", "down"), ("ffn.3.bias", "down_bias"),
        ("ffn_gate.weight", "gate"), ("ffn_gate.bias", "gate_bias")]],
    ("norm.weight", "final_norm"),
    ("lm_head.weight", "lm_head"),
])

# Opt-in: the block's own projections too, W_z from v_proj (the nearest "similar weight", docs/conversion.md).
EXTENDED_TABLE = {**DEFAULT_TABLE, **_entries(
    [(_B + t, r) for t, r in [
        ("W_q.weight", "q"), ("W_q.bias", "q_bias"), ("W_k.weight", "k"), ("W_k.bias", "k_bias"),
        ("W_v.weight", "v"), ("W_v.bias", "v_bias"), ("W_z.weight", "v"), ("W_z.bias", "v_bias")]],
    repeat=_KV_ROLES)}

TABLES = {"default": DEFAULT_TABLE, "extended": EXTENDED_TABLE, "none": {}}


def _parse_entry(raw: Any, where: str) -> MapEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("target"), str):
        raise PlanError(f"{where}: each mapping needs a 'target' string, got {short(raw)}")
    unknown = set(raw) - {"target", "source", "role", "transforms", "repeat_kv", "score"}
    if unknown:
        raise PlanError(f"{where}: mapping for {short(raw['target'])} has unknown keys {sorted(unknown)}")
    transforms = raw.get("transforms") or []
    if not isinstance(transforms, list) or not all(isinstance(t, dict) and "op" in t for t in transforms):
        raise PlanError(f"{where}: 'transforms' of {short(raw['target'])} must be a list of {{op: ...}} objects")
    from ..transforms import check_ops

    try:
        check_ops(transforms)
    except ValueError as exc:
        raise PlanError(f"{where}: mapping for {short(raw['target'])}: {exc}") from None
    score = raw.get("score")
    if score is not None and score not in (1.0, 0.8, 0.5, 0.0):
        raise PlanError(f"{where}: score of {short(raw['target'])} must be 1.0, 0.8, 0.5 or 0.0")
    return MapEntry(raw["target"], role=raw.get("role"), source=raw.get("source"),
                    transforms=tuple(transforms), repeat_kv=bool(raw.get("repeat_kv", False)),
                    score=None if score is None else float(score))


# A mapping file is a table of a few hundred names: 16 MiB is far beyond any real one. Its YAML, with
# aliases expanded (`*a` counts the nodes of what it names each time), may hold at most 1 000 000 nodes,
# so a few-line "billion laughs" file is refused before anything walks (or prints) the expanded structure.
MAX_MAPPING_FILE_BYTES = 16 << 20
MAX_MAPPING_NODES = 1_000_000


def _read_bounded(path: Path) -> str:
    """The file's text: a regular file (a FIFO would block the open) of at most MAX_MAPPING_FILE_BYTES."""
    import os
    import stat

    where = f"--mapping-file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PlanError(f"{where}: is not a regular file; only regular files are read")
            if st.st_size > MAX_MAPPING_FILE_BYTES:
                raise PlanError(f"{where}: {st.st_size} bytes is over the {MAX_MAPPING_FILE_BYTES}-byte limit "
                                "for a mapping file")
            os.set_blocking(fd, True)
            raw = os.read(fd, MAX_MAPPING_FILE_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise PlanError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_MAPPING_FILE_BYTES:
        raise PlanError(f"{where}: over the {MAX_MAPPING_FILE_BYTES}-byte limit for a mapping file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _load_yaml_bounded(path: Path, text: str) -> Any:
    """yaml.safe_load, but the node graph is measured with every alias expanded (linear in the distinct
    nodes: each node's expanded size is computed once) and refused over MAX_MAPPING_NODES before it is
    constructed, so nothing later can iterate or repr an exponentially large structure."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}
        stack = [(node, False)]
        while stack:  # iterative post-order: a deeply nested document cannot exhaust the Python stack
            current, done = stack.pop()
            key = id(current)
            if key in sizes and not done:
                continue
            if isinstance(current, yaml.SequenceNode):
                children = current.value
            elif isinstance(current, yaml.MappingNode):
                children = [n for pair in current.value for n in pair]
            else:
                children = []
            if not done:
                sizes[key] = -1  # in progress: a recursive alias is refused below
                stack.append((current, True))
                for child in children:
                    if sizes.get(id(child)) == -1:
                        raise PlanError(f"--mapping-file {path}: a YAML alias refers to a node that contains it")
                    if id(child) not in sizes:
                        stack.append((child, False))
                continue
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_MAPPING_NODES:
                raise PlanError(f"--mapping-file {path}: YAML with its aliases expanded holds more than "
                                f"{MAX_MAPPING_NODES} nodes (nested aliases?); a mapping file is a small table")
            sizes[key] = total
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_mapping_file(path: Path) -> tuple[str | None, list[MapEntry]]:
    """A JSON or YAML file: {"base": "default"|"extended"|"none", "mappings": [...] or {target: source}},
    or just the list of mappings. Returns (base or None, entries)."""
    path = Path(path)
    text = _read_bounded(path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _load_yaml_bounded(path, text)
    except PlanError:
        raise
    except Exception as exc:  # json and yaml raise different types; both mean "not parseable"
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 300 else reason[:295] + " ..."
        raise PlanError(f"--mapping-file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                        f" ({reason})") from None
    base = None
    if isinstance(data, dict) and ("mappings" in data or "base" in data):
        base, data = data.get("base"), data.get("mappings", [])
        if base is not None and base not in TABLES:
            raise PlanError(f"--mapping-file {path}: 'base' must be one of {sorted(TABLES)}, got {short(base)}")
    if isinstance(data, dict):  # shorthand {target: source pattern | null | {role: ...}}
        data = [{"target": t, **(v if isinstance(v, dict) else {"source": v})} for t, v in data.items()]
    if not isinstance(data, list):
        raise PlanError(f"--mapping-file {path}: expected a list of mappings or {{'mappings': ...}}")
    return base, [_parse_entry(raw, f"--mapping-file {path}") for raw in data]


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def target_layer(target_key: str) -> int | None:
    m = _BLOCK.match(target_key)
    return int(m.group(1)) if m else None


def target_pattern(target_key: str) -> str:
    return _BLOCK.sub("blocks.{i}.", target_key, count=1)


class ModelWeightConverter:
    """The converter of the Python API: a mapping table plus the key matching rule.

    Subclass and override `_keys_match(source_pattern, source_key, target_key)` to accept other source
    names; `self.source_layer(target_key)` gives the source layer the layer map assigns.
    """

    def __init__(self, mapping: str = "default", mapping_file: Path | str | None = None):
        if mapping not in ("default", "extended"):
            raise PlanError(f"--mapping must be 'default' or 'extended', got {short(mapping)}")
        self.mapping = mapping
        self.mapping_file = Path(mapping_file) if mapping_file else None
        self.table: dict[str, MapEntry] = dict(TABLES[mapping])
        self.mapping_file_sha256: str | None = None
        if self.mapping_file is not None:
            base, entries = load_mapping_file(self.mapping_file)
            if base is not None:
                self.table = dict(TABLES[base])
            self.table.update({e.target: e for e in entries})
            self.mapping_file_sha256 = hashlib.sha256(self.mapping_file.read_bytes()).hexdigest()
        self.layer_map: list[int | None] = []

    # -- table lookups ------------------------------------------------------------------------------
    def entry_for(self, target_key: str) -> MapEntry | None:
        """An exact entry for this key wins over its '{i}' pattern."""
        return self.table.get(target_key) or self.table.get(target_pattern(target_key))

    def source_layer(self, target_key: str) -> int | None:
        t = target_layer(target_key)
        return None if t is None or t >= len(self.layer_map) else self.layer_map[t]

    def expand(self, source_pattern: str, target_key: str) -> str:
        """The source name a pattern stands for, for this target key ('{i}' -> its source layer)."""
        if "{i}" not in source_pattern:
            return source_pattern
        layer = self.source_layer(target_key)
        return source_pattern.replace("{i}", str(layer)) if layer is not None else source_pattern

    # -- the extension point (override in a subclass) -----------------------------------------------------------------
    def _keys_match(self, source_pattern: str, source_key: str, target_key: str) -> bool:
        return source_key == self.expand(source_pattern, target_key)

    def find_source(self, source_pattern: str, target_key: str, names: Iterable[str]) -> str | None:
        """The first source name that `_keys_match` accepts (the expanded name itself is tried first)."""
        expected = self.expand(source_pattern, target_key)
        names = names if isinstance(names, (dict, set)) else list(names)
        if expected in names and self._keys_match(source_pattern, expected, target_key):
            return expected
        if type(self)._keys_match is ModelWeightConverter._keys_match:
            return None  # the base rule accepts only the expanded name
        for key in names:
            if self._keys_match(source_pattern, key, target_key):
                return key
        return None

    def describe(self) -> dict[str, Any]:
        cls = type(self)
        return {"mapping": self.mapping, "mapping_file": str(self.mapping_file) if self.mapping_file else None,
                "mapping_file_sha256": self.mapping_file_sha256,
                "converter": f"{cls.__module__}.{cls.__qualname__}"}

    def plan(self, catalog, analysis, overrides: dict | None = None, **options):
        """build_plan with this converter."""
        from . import build_plan

        return build_plan(catalog, analysis, overrides, converter=self, **options)
