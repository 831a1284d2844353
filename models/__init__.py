"""Model components and their registries; ``create_model`` builds a ``DualEncoderModel`` from config.

The names below load on first use (PEP 562), so ``models.registry`` (the torch-free config
base) can be imported by the config layer and plain tools without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "AUDIO_ENCODERS": "models.audio_encoders",
    "CNN14Encoder": "models.audio_encoders",
    "SmallCNNEncoder": "models.audio_encoders",
    "WhisperEncoder": "models.hf_audio",
    "ClapAudioEncoder": "models.hf_audio",
    "Wav2Vec2BertEncoder": "models.hf_audio",
    "ASTEncoder": "models.hf_audio",
    "AutoTextEncoder": "models.hf_text",
    "ClapTextEncoder": "models.hf_text",
    "CLIPTextEncoder": "models.hf_text",
    "TEXT_ENCODERS": "models.text_encoders",
    "SentBERTBaseEncoder": "models.text_encoders",
    "LOSSES": "models.losses",
    "LogSoftmaxLoss": "models.losses",
    "ClipLoss": "models.losses",
    "SequenceContrastiveLoss": "models.losses",
    "PROJECTIONS": "models.heads",
    "LinearProjection": "models.heads",
    "MLPProjection": "models.heads",
    "IdentityProjection": "models.heads",
    "DualEncoderModel": "models.dual_encoder",
    "create_model": "models.dual_encoder",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
