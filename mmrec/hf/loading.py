"""from_pretrained for MMRecForCausalLM: a converted directory, loaded by mmrec.checkpoint.

The runtime's loader already reads the converter's files tensor by tensor (memory-mapped on CPU, streamed
through pinned buffers to a GPU) under the names it wrote, so transformers' own loader is not used. This
module only translates transformers' keyword arguments (dtype, device_map, ...) into that loader's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig

from ..checkpoint import load_pretrained, torch_dtype
from ..config import ConfigError
from ..config import MMRecConfig as RuntimeConfig
from ..model import MMRecModel
from .configuration import RUNTIME_FIELDS, MMRecConfig

# Keyword arguments of transformers' from_pretrained that mean nothing for a local converted directory.
_IGNORED = {"revision", "trust_remote_code", "cache_dir", "force_download", "local_files_only", "token",
            "use_safetensors", "weights_only", "low_cpu_mem_usage", "attn_implementation",
            "max_memory", "offload_folder", "offload_state_dict", "disable_mmap", "_from_auto",
            "_from_pipeline", "proxies", "resume_download", "code_revision", "key_mapping", "use_kernels"}
# Ones that ask for something this loader does not do: refused by name rather than silently dropped.
_UNSUPPORTED = {"quantization_config", "load_in_8bit", "load_in_4bit", "gguf_file", "tp_plan", "state_dict",
                "adapter_name", "output_loading_info"}


def load_converted(cls, path, config: MMRecConfig | None = None, **kwargs):
    adapter = (kwargs.pop("adapter_kwargs", None) or {}).get("_adapter_model_path")
    if adapter:  # AutoModelForCausalLM found an adapter_config.json there and swapped in its base model
        raise NotImplementedError(f"{adapter} is a PEFT adapter: load its base model, then "
                                  "peft.PeftModel.from_pretrained(model, adapter_dir)")
    directory = _checked_directory(Path(path) / (kwargs.pop("subfolder", None) or ""))
    dtype = _dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
    device = _device(kwargs.pop("device_map", None))
    for key in _IGNORED:
        kwargs.pop(key, None)
    refused = sorted(k for k in _UNSUPPORTED if kwargs.get(k))
    if refused:
        raise NotImplementedError(f"MM-Rec's from_pretrained does not support {', '.join(refused)}")
    for key in _UNSUPPORTED:
        kwargs.pop(key, None)
    if config is None:
        try:
            config = MMRecConfig.from_pretrained(directory)
        except ConfigError as exc:
            raise ConfigError(f"{directory / 'config.json'}: {exc}") from None
    for key, value in kwargs.items():  # transformers' rule: other keyword arguments update the config
        if not hasattr(config, key):
            raise TypeError(f"from_pretrained got an unexpected keyword argument {key!r}")
        setattr(config, key, value)
    _check_model_fields(config, directory)
    runtime = load_pretrained(MMRecModel, directory, device=device, dtype=dtype)
    config._name_or_path = str(path)
    model = cls(config, runtime=runtime)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def _check_model_fields(config: MMRecConfig, directory: Path) -> None:
    """The runtime builds the modules from config.json, so a config given here (or changed by keyword
    arguments, which AutoModelForCausalLM applies to it first) must agree with the file on every model field."""
    stored = RuntimeConfig.load(directory)
    changed = [name for name in RUNTIME_FIELDS if getattr(config, name) != getattr(stored, name)]
    if changed:
        raise ValueError(f"{', '.join(changed)} would differ from {directory / 'config.json'}; model fields come "
                         "from that file and cannot be changed while loading")


def _checked_directory(path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise OSError(f"{directory}: not a directory; MMRecForCausalLM loads a local converted checkpoint "
                      "(the output directory of `mmrec shard-convert`)")
    if not (directory / "config.json").is_file():
        raise OSError(f"{directory / 'config.json'}: no such file; is {directory} a converted MM-Rec checkpoint?")
    return directory


def _dtype(dtype, legacy_dtype):
    """None or "auto": the stored dtype (config.json's torch_dtype); otherwise that dtype."""
    value = dtype if dtype is not None else legacy_dtype
    if value is None or value == "auto":
        return None
    return torch_dtype(value)


def _device(device_map) -> torch.device:
    """One device: the model's state is carried from block to block, so it is not split across devices."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise NotImplementedError(f"device_map places the model on several devices ({sorted(map(str, devices))}); "
                                      "MM-Rec loads onto one device")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0", "sequential"):
        raise NotImplementedError(f"device_map={device_map!r} splits the model; use 'auto' or one device")
    return torch.device(device_map)
