"""Name -> class registries, one per component kind (audio encoders, text encoders, losses)."""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import Field

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Maps the class names used in ``conf.yaml`` to classes.

    Every registered class carries a pydantic ``Config`` model whose ``name`` field is a
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
        return sorted(self._classes)

    def get(self, name: str) -> T:
        """Return the class registered as ``name``; a typo lists the valid names."""
        try:
            return self._classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._classes, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(self.names())}") from None

    def build(self, config: Any, **extra: Any) -> Any:
        """Instantiate the class named by ``config.name`` with the config's other fields."""
        cls = self.get(config.name)
        kwargs = config.model_dump(exclude={"name"})
        return cls(**kwargs, **extra)

    def config_union(self) -> Any:
        """Type of a config field that accepts the ``Config`` of any registered class."""
        configs = tuple(cls.Config for cls in self._classes.values())
        if len(configs) == 1:
            return configs[0]
        return Annotated[Union[configs], Field(discriminator="name")]
