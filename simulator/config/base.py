"""One strict base for every input model: unknown keys are errors, instances are frozen, and each field's
attribute docstring is its description (the CLI help and the dashboard tooltip)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from hwprofiles._docstrings import DescribedFields


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, ignored_types=(DescribedFields,))

    model_fields = DescribedFields()  # descriptions from the attribute docstrings, read on first use
