"""Component registries and the strict config base that every component's ``Config`` derives from.

Torch-free on purpose: the config layer imports this to build its schema, and plain tools
(dataset indexing, ``--help``) can read configs without loading any model code.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T", bound=type)
C = TypeVar("C", bound="StrictModel")


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys (a typo fails with its dotted path) and validates
    assignments, so a config cannot be put into a state its constraints forbid."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def configured(schema: type[C], config: C | None, fields: dict[str, Any]) -> C:
    """A component's validated config: ``config`` as given, or one built from keyword ``fields``.

    Components take their ``Config`` (what the registry passes), and users' scripts may write
    ``LogSoftmaxLoss(temperature=0.1)`` instead; either way the values pass the same checks
    as in ``conf.yaml`` and the defaults live only in the ``Config`` class.
    """
    if config is not None and (fields or not isinstance(config, schema)):
        raise TypeError(
            f"takes a {schema.__qualname__} or keyword fields ({', '.join(schema.model_fields)}), not {config!r}"
            + (f" and {sorted(fields)}" if fields else "")
        )
    return config if config is not None else schema(**fields)


class Registry(Generic[T]):
    """Maps the class names used in ``conf.yaml`` to classes, one registry per component kind.

    Every registered class carries a ``Config`` (a ``StrictModel``) whose ``name`` field is a
    ``Literal`` of the class name, so the registry can also hand the config layer a
    discriminated union: a typo in ``name`` is rejected while the config is parsed.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: register ``cls`` under its own class name."""
        name = cls.__name__
        if name in self._classes:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        declared = cls.Config.model_fields["name"].default
        if declared != name:
            raise TypeError(f"{name}.Config.name defaults to {declared!r}, expected {name!r}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> T:
        """Return the class registered as ``name``; a typo lists the valid names."""
        try:
            return self._classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._classes, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(self.names())}") from None

    def build(self, config: StrictModel, **inputs: Any) -> Any:
        """Instantiate the class named by ``config.name`` with that config and the runtime ``inputs``
        (sizes that come from the data, such as ``n_mels``)."""
        cls = self.get(config.name)
        # a class whose constructor takes its own arguments (a contract users call) builds through from_config
        make = getattr(cls, "from_config", None)
        return make(config, **inputs) if make is not None else cls(config, **inputs)

    def config_union(self) -> Any:
        """Type of a config field that accepts the ``Config`` of any registered class."""
        configs = tuple(cls.Config for cls in self._classes.values())
        if len(configs) == 1:
            return configs[0]
        return Annotated[Union[configs], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple of types)
