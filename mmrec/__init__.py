"""MM-Rec runtime: config, model, sharded checkpoints and the conversion-init helper.

Importing this package never imports dask or typer (the conversion engine lives in `mmrec.streaming`,
the command line in `mmrec.cli`).
"""

from .config import ConfigError, MMRecConfig
from .init import conversion_init
from .model import BlockState, MMRecModel
from .schema import ParamSpec, parameter_count, parameter_specs

__all__ = ["BlockState", "ConfigError", "MMRecConfig", "MMRecModel", "ParamSpec", "conversion_init",
           "parameter_count", "parameter_specs"]
__version__ = "0.1.0"
