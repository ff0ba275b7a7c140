"""fitsim: will this fine-tuning or serving setup fit, how fast, at what cost.

Public API::

    from simulator import estimate, Scenario, get_model
    e = estimate({"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "method": {"kind": "qlora"}})
"""

from __future__ import annotations

from .config import ModelArch, Scenario
from .estimate import estimate
from .models import from_hf_config, get_model, list_models
from .results import Estimate

__all__ = ["estimate", "Scenario", "ModelArch", "get_model", "list_models", "from_hf_config", "Estimate"]
