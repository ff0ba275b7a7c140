"""One strict base for every input model: unknown keys are errors, instances are frozen, and each field's
attribute docstring is its description (the CLI help and the dashboard tooltip)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from hwprofiles._docstrings import attach


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        attach(cls)
