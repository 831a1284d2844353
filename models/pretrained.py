"""Pretrained models named by one config value: a hub id, ``id@revision`` or a local ``save_pretrained`` folder.

A cluster without internet swaps a hub id for a local copy with one dotted override
(``model.audio_enc.model_id=/models/whisper-large-v3``). A model that cannot be had fails with one
``ConfigError`` naming the config key and the id, after at most one short question to the hub, never
minutes of retries. Torch-free: ``transformers`` and the hub client load only when a model does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from utils.errors import ConfigError

HUB_TIMEOUT_S = 10  # one question to the hub before downloading, instead of minutes of retries
M = TypeVar("M")


def parse_model_id(model_id: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; an existing folder (or a plain id) has no revision."""
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser()), None
    name, _, revision = model_id.partition("@")
    return name, revision or None


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def load_pretrained(loader: Callable[..., M], model_id: str, key: str, **kwargs: Any) -> M:
    """``loader(name, revision=..., **kwargs)`` (a ``from_pretrained``) for ``model_id``: a local folder, else
    the Hugging Face cache, else a download after the hub confirmed the id. Anything that cannot be
    loaded is one ``ConfigError`` naming ``key`` and the id. A ``subfolder`` in ``kwargs`` (where the model sits
    in the folder or repository) is passed on, and the cache is looked up there."""
    name, revision = parse_model_id(model_id)
    if Path(name).is_dir():
        try:
            return loader(name, **kwargs)
        except Exception as err:  # a folder of another model kind, or damaged files
            raise ConfigError(f"{key}: cannot load {model_id!r} from its folder ({_reason(err)})") from None
    from huggingface_hub import model_info, try_to_load_from_cache

    # A model's config.json, or a tokenizer's tokenizer_config.json, under the subfolder it is loaded from (a Stable
    # Diffusion repository has neither at its root: text_encoder/config.json, tokenizer/tokenizer_config.json)
    folder = f"{kwargs['subfolder']}/" if kwargs.get("subfolder") else ""
    try:  # in the cache? (a path that is no folder is no valid hub id either: that is asked below)
        cached = any(
            isinstance(try_to_load_from_cache(name, folder + marker, revision=revision), str)
            for marker in ("config.json", "tokenizer_config.json")
        )
    except Exception:
        cached = False
    if cached:
        try:
            return loader(name, revision=revision, local_files_only=True, **kwargs)
        except Exception:  # not completely in the cache: ask the hub once, with a short timeout
            pass

    try:
        model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # offline mode, no network, unknown id or revision, gated repo: "cannot load"
        raise ConfigError(
            f"{key}: cannot load {model_id!r}: it is no local folder, not in the Hugging Face cache, and the hub "
            f"did not give it ({_reason(err)}); download it once where there is internet, or name a local "
            "folder written by save_pretrained"
        ) from None
    try:
        return loader(name, revision=revision, **kwargs)
    except Exception as err:
        raise ConfigError(f"{key}: cannot load {model_id!r} ({_reason(err)})") from None
