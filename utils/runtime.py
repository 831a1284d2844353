"""Process-wide decisions made in one place: random seeds and the compute device."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from utils.errors import ConfigError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a trial is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(choice: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when a GPU is visible, else the CPU; ``"cuda"`` without a GPU is an error."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but no CUDA GPU is visible to this process; use cpu or auto")
    return torch.device(choice)
