"""Named model architectures (``simulator/models/*.yaml``) and a loader for local Hugging Face configs.

>>> from simulator.models import get_model, list_models, from_hf_config
>>> get_model("meta-llama/Llama-3.1-8B").name
'llama-3.1-8b'
"""

from .catalog import UnknownNameError, from_hf_config, get_model, list_models, resolve_model_name, supported_model_types

__all__ = [
    "UnknownNameError",
    "from_hf_config",
    "get_model",
    "list_models",
    "resolve_model_name",
    "supported_model_types",
]
