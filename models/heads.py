"""Projection heads into the shared space, one registry (``model.projection.name`` in the config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt
from torch import nn

from models.registry import Registry, StrictModel, configured
from utils.errors import ConfigError

PROJECTIONS: Registry[type[nn.Module]] = Registry("projection")


@PROJECTIONS.register
class LinearProjection(nn.Linear):
    """One linear layer ``(B, in_dim) -> (B, out_dim)`` (the DCASE baseline's head). It is an
    ``nn.Linear`` itself, so its weights keep the plain ``audio_proj.weight`` names."""

    class Config(StrictModel):
        name: Literal["LinearProjection"] = "LinearProjection"

    def __init__(self, config: Config | None = None, *, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        self.config = configured(self.Config, config, {})


@PROJECTIONS.register
class MLPProjection(nn.Sequential):
    """Two layers with a ReLU between, ``in_dim -> hidden_dim -> out_dim`` (LAION CLAP's heads)."""

    class Config(StrictModel):
        name: Literal["MLPProjection"] = "MLPProjection"
        hidden_dim: PositiveInt | None = None  # None: the output width, as CLAP does
        dropout: float = Field(0.0, ge=0, lt=1)

    def __init__(self, config: Config | None = None, *, in_dim: int, out_dim: int, **fields: object) -> None:
        config = configured(self.Config, config, fields)
        hidden = config.hidden_dim or out_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(hidden, out_dim))
        self.config = config


@PROJECTIONS.register
class IdentityProjection(nn.Identity):
    """No head: the tower's output (after its adapter) is the embedding, as in the Whisper audio-text embedder.
    The tower's width must then be ``embed_dim``."""

    class Config(StrictModel):
        name: Literal["IdentityProjection"] = "IdentityProjection"

    def __init__(self, config: Config | None = None, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim != out_dim:
            raise ConfigError(
                f"model.projection IdentityProjection needs towers of width model.embed_dim {out_dim}, got {in_dim}: "
                "give the tower an adapter of that width, or another projection"
            )
        self.config = configured(self.Config, config, {})
