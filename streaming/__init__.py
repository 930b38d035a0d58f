"""The conversion engine: sources -> analysis -> plan -> dask graph -> sharded safetensors -> report.

Heavy pieces (torch, dask) are imported by the functions that need them, so header-only commands stay
fast. The Python conversion API (convert_model_weights, ModelWeightConverter, target_config) is
re-exported here.
"""


def convert_model_weights(*args, **kwargs):
    """See mmrec.streaming.guide_api.convert_model_weights."""
    from .guide_api import convert_model_weights as run

    return run(*args, **kwargs)


def __getattr__(name):  # without importing the planner eagerly
    if name == "ModelWeightConverter":
        from .plan.mapping import ModelWeightConverter

        return ModelWeightConverter
    if name in ("target_config", "TargetModelError"):
        from . import guide_api

        return getattr(guide_api, name)
    raise AttributeError(name)
