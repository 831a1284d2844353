"""Model components and their registries; ``create_model`` builds a ``DualEncoderModel`` from config."""
from models.audio_encoders import AUDIO_ENCODERS, CNN14Encoder, SmallCNNEncoder
from models.dual_encoder import DualEncoderModel, create_model
from models.text_encoders import TEXT_ENCODERS, SentBERTBaseEncoder

__all__ = [
    "AUDIO_ENCODERS",
    "TEXT_ENCODERS",
    "CNN14Encoder",
    "SmallCNNEncoder",
    "SentBERTBaseEncoder",
    "DualEncoderModel",
    "create_model",
]
