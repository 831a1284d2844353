"""Loading weights into a model with a clear answer when they belong to another architecture."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from pickle import UnpicklingError  # only the exception torch raises for refused content; nothing is unpickled here

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from utils.errors import CheckpointError

SHOWN = 8  # keys listed per kind of mismatch; the rest are counted


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``CheckpointError`` listing the keys missing from ``found``, the keys it has in excess
    and the tensors whose shapes differ; silent when ``found`` fits ``expected`` exactly."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = [
        f"{k}: {tuple(found[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    problems = [
        f"{label} {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source}: weights from another architecture; " + "; ".join(problems))


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """``module.load_state_dict(state)`` after ``check_state_dict``, so a mismatch names its keys.

    The check is against ``module.state_dict()``, which leaves out frozen pretrained backbones (their
    weights are their model id's): having passed it, ``strict=False`` only lets those stay as loaded."""
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=False)
    return module


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file on the CPU; a file of another kind is a ``CheckpointError``."""
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def read_torch_file(path: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers (``weights_only``) on the CPU.

    A file that needs any other object to load is refused rather than run: unpickling
    arbitrary objects can execute code. Corrupt and truncated files are a ``CheckpointError``.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:  # corrupt files fail in many ways inside torch and its unpickler
        # torch's message is long and ends in advice to load unsafely; keep the line naming the culprit
        culprit = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        if isinstance(err, UnpicklingError) and culprit:
            raise CheckpointError(
                f"{path}: refused, it holds pickled objects ({culprit}); only tensors and plain "
                "containers are loaded, because unpickling other objects can run code"
            ) from None
        # torch names the problem in its zip reader's RuntimeErrors; the unpickler's errors say nothing useful
        reason = (
            str(err).split(". ")[0] if isinstance(err, RuntimeError) else "corrupt, cut short or another kind of file"
        )
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
