"""fitsim: will this fine-tuning or serving setup fit, how fast, at what cost.

Public API::

    from simulator import estimate, Scenario, get_model
    e = estimate({"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "method": {"kind": "qlora"}})
"""

from __future__ import annotations

import gc

from .config import ModelArch, Scenario
from .estimate import estimate
from .models import from_hf_config, get_model, list_models
from .results import Estimate

# The schemas, validators and profiles built on import live as long as the process: moved out of the
# collector's reach, a full collection no longer rescans their tens of thousands of objects each time an
# estimate's allocations trigger one (20-35 ms of a 45 ms first estimate on a 2-core machine)
gc.freeze()

_PLAN_NAMES = ("plan", "PlanResult", "SearchSpace", "Constraints", "Job")


def __getattr__(name: str):
    """The planner on first use: it evaluates candidates with numpy, which ``estimate`` alone never needs."""
    if name in _PLAN_NAMES:
        import importlib

        return getattr(importlib.import_module(".planner", __name__), name)
    raise AttributeError(f"module 'simulator' has no attribute {name!r}")

__all__ = ["estimate", "plan", "Scenario", "ModelArch", "get_model", "list_models", "from_hf_config", "Estimate",
           "PlanResult", "SearchSpace", "Constraints", "Job"]
