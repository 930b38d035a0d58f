"""MM-Rec runtime: config, model, sharded checkpoints and the conversion-init helper.

Importing this package never imports dask or typer (the conversion engine lives in `mmrec.streaming`,
the command line in `mmrec.cli`). Names that need torch load on first use, so header-only tools
(`mmrec inspect`, `mmrec plan`) answer without paying for `import torch`.
"""

from importlib import import_module

from .config import ConfigError, MMRecConfig
from .schema import ParamSpec, parameter_count, parameter_specs

_LAZY = {"MMRecModel": "model", "BlockState": "state", "conversion_init": "init"}

__all__ = ["BlockState", "ConfigError", "MMRecConfig", "MMRecModel", "ParamSpec", "conversion_init",
           "parameter_count", "parameter_specs"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmrec' has no attribute {name!r}")
