"""The teacher, streamed: a `transformers` causal LM whose parameters live on the meta device, given real
weights from the memory-mapped source one piece at a time (the embedding, then one decoder layer, then
the head), so the teacher is never whole in memory.

The math is transformers' own (RoPE, grouped-query heads, GPT-J/NeoX parallel blocks, Gemma's scaled
embedding): we only cut its forward pass at the decoder layers. Running the model up to its first layer
captures the hidden state entering layer 0 and the keyword arguments every layer receives (position
embeddings, masks); each layer is then called with those arguments.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..sources.catalog import normalize_name

ATTENTION_NAMES = ("self_attn", "attn", "attention")  # a decoder layer's attention module, by family
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm")  # the base model's last norm, by family


class TeacherError(ValueError):
    """A source that cannot serve as a teacher; the message names the file or tensor."""


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers (rotary tables) real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


class StreamedTeacher:
    """The source model, run piece by piece: `embed` (inside `embedding_loaded()`), `run_layer` (inside
    `layer(i)`), `logits` (inside `head_loaded()`). Outside those blocks no parameter holds memory."""

    def __init__(self, catalog, device: torch.device, dtype: torch.dtype = torch.float32):
        try:
            import transformers
        except ImportError:
            raise TeacherError("mmrec distill runs the teacher with transformers: "
                               "pip install 'mmrec[distill]'") from None
        if not catalog.config or "model_type" not in catalog.config:
            raise TeacherError(f"{catalog.root}: a teacher needs the transformers config.json beside its weights")
        self.catalog, self.device, self.dtype = catalog, device, dtype
        try:
            config = transformers.AutoConfig.for_model(**catalog.config)
        except (ValueError, KeyError, TypeError) as exc:
            raise TeacherError(f"{catalog.root}/config.json: transformers cannot build this model ({exc})") from None
        config.use_cache = False
        with _parameters_on_meta():
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        for module in self.model.modules():  # buffers (rotary tables) to the device; parameters stay on meta
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta:
                    module._buffers[name] = buffer.to(device)
        self.config = config
        self.layers, self.layers_prefix = self._find_layers()
        base = self.model.base_model
        self.final_norm = next((getattr(base, n) for n in FINAL_NORM_NAMES if hasattr(base, n)), None)
        if self.final_norm is None:
            raise TeacherError(f"{config.model_type}: no final norm found (looked for {FINAL_NORM_NAMES})")
        self.head = self.model.get_output_embeddings()
        # Names are fixed here, once, from module paths (loading replaces Parameter objects, and a tied head
        # shares its Parameter with the embedding, so ids name neither reliably).
        module_name = {id(m): n for n, m in self.model.named_modules()}
        self._embedding_name = f"{module_name[id(self.model.get_input_embeddings())]}.weight"
        head_prefix = module_name[id(self.head)]
        self._head_name = f"{head_prefix}.weight"
        self._norm_prefix = module_name[id(self.final_norm)]
        self._head_side = {f"{self._norm_prefix}.{n}" for n, _ in self.final_norm.named_parameters()}
        self._head_side |= {f"{head_prefix}.{n}" for n, _ in self.head.named_parameters(remove_duplicate=False)}
        self._layer_kwargs: dict[tuple[int, int], dict[str, Any]] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _find_layers(self) -> tuple[nn.ModuleList, str]:
        count = getattr(self.config, "num_hidden_layers", None)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return module, name
        raise TeacherError(f"{self.config.model_type}: no list of {count} decoder layers found")

    # -- weights ---------------------------------------------------------------------------------------
    def _source_name(self, full_name: str) -> str:
        name = normalize_name(full_name)
        if name in self.catalog.tensors:
            return name
        if full_name == self._head_name:
            # The head may be saved under the family's own name (GPT-NeoX: embed_out), or, tied, only as
            # the embedding.
            for candidate in (self._family_head_name(), normalize_name(self._embedding_name)):
                if candidate in self.catalog.tensors:
                    return candidate
        raise TeacherError(f"{self.catalog.root}: the teacher needs tensor {name!r} ({full_name}), which the "
                           f"source does not have")

    def _family_head_name(self) -> str | None:
        from ..analysis import analyze
        from ..families import get_family

        family = get_family(self.config.model_type)
        if family is None:
            return None
        global_roles, _ = family.roles(analyze(self.catalog), set(self.catalog.tensors))
        head = global_roles.get("lm_head")
        return head.pattern if head is not None else None

    def _load(self, module: nn.Module, prefix: str) -> None:
        for name, param in list(module.named_parameters(remove_duplicate=False)):
            full = f"{prefix}{name}"
            source = self.catalog.read(self._source_name(full))
            if tuple(source.shape) != tuple(param.shape):
                raise TeacherError(f"{self.catalog.root}: tensor {normalize_name(full)!r} is "
                                   f"{list(source.shape)}, the config says {list(param.shape)}")
            _set(module, name, source.to(device=self.device, dtype=self.dtype))

    @staticmethod
    def _unload(module: nn.Module) -> None:
        for name, param in list(module.named_parameters(remove_duplicate=False)):
            _set(module, name, torch.empty_like(param, device="meta"))

    @contextlib.contextmanager
    def layer(self, i: int):
        """Decoder layer i with real weights inside the block, back on meta after it."""
        layer = self.layers[i]
        self._load(layer, f"{self.layers_prefix}.{i}.")
        try:
            yield layer
        finally:
            self._unload(layer)

    # -- forward pieces ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def embedding_loaded(self):
        """What runs before layer 0 (embeddings) with real weights inside the block, so many batches can be
        embedded with one read of them."""
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)
                 if not n.startswith(self.layers_prefix + ".")
                 and (n not in self._head_side or n == self._embedding_name)]
        for name in names:
            source = self.catalog.read(self._source_name(name))
            _set(self.model, name, source.to(device=self.device, dtype=self.dtype))
        self._embedding_ready = True
        try:
            yield
        finally:
            self._embedding_ready = False
            for name in names:
                _set(self.model, name, torch.empty(self.model.get_parameter(name).shape, device="meta"))

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The hidden state entering layer 0 for ids [B, T]; remembers the layers' keyword arguments."""
        if not getattr(self, "_embedding_ready", False):
            with self.embedding_loaded():
                return self.embed(ids)
        captured = {}

        def capture(module, args, kwargs):
            captured["hidden"], captured["args"], captured["kwargs"] = args[0] if args else \
                kwargs.pop("hidden_states"), args[1:], kwargs
            raise _StopForward

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model(input_ids=ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        self._layer_kwargs[tuple(ids.shape)] = {"args": captured["args"], "kwargs": captured["kwargs"]}
        return captured["hidden"]

    def attention_of(self, layer: nn.Module) -> nn.Module:
        for name in ATTENTION_NAMES:
            if hasattr(layer, name):
                return getattr(layer, name)
        raise TeacherError(f"{self.config.model_type}: no attention module in a decoder layer "
                           f"(looked for {ATTENTION_NAMES})")

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output, its attention branch's output) for hidden [B, T, D] entering the layer."""
        extra = self._layer_kwargs.get(tuple(hidden.shape[:2]))
        if extra is None:
            raise RuntimeError(f"no layer arguments for shape {tuple(hidden.shape[:2])}: call embed() first")
        seen = {}

        def keep(module, args, output):
            seen["attn"] = output[0] if isinstance(output, tuple) else output

        handle = self.attention_of(layer).register_forward_hook(keep)
        try:
            out = layer(hidden.to(self.device, self.dtype), *extra["args"], **extra["kwargs"])
        finally:
            handle.remove()
        return (out[0] if isinstance(out, tuple) else out), seen["attn"]

    @contextlib.contextmanager
    def head_loaded(self):
        """The final norm and the output head with real weights inside the block."""
        head_prefix = self._head_name.rpartition(".")[0]
        self._load(self.final_norm, self._norm_prefix + ".")
        self._load(self.head, head_prefix + "." if head_prefix else "")
        try:
            yield
        finally:
            self._unload(self.final_norm)
            self._unload(self.head)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the hidden state after the last layer (inside `head_loaded()`)."""
        return self.head(self.final_norm(hidden.to(self.device, self.dtype))).float()
