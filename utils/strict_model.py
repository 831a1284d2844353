"""Base class of every config model: unknown keys are errors, values are validated on assignment."""
from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys, so a typo fails with its dotted path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
