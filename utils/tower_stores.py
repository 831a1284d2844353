"""The stores of the ``transformers`` towers: what each tower of a config reads, where, and
whether a store on disk is the one the config asks for.

- A trainable audio tower reads its model inputs (its feature extractor's output, ``kind: inputs``).
- A frozen audio tower reads its backbone's outputs (``kind: outputs``): one mean frame per view when its
  head commutes with the pooling, all frames (float16) otherwise.
- A frozen text tower reads one vector per caption (``kind: text_outputs``); a trainable one tokenises
  in the data loader and needs no store.

Each store is ``<dataset_dir>/{split}_{name}.h5`` (``name``: the tower's ``store`` setting, or
``<Tower>_<kind>_<digest of the settings>``). It records the settings it was made with (``settings``
attribute: model id, revision, layer, extractor and view settings) and the clip or caption list, so a
stale store is refused with what differs. Items are views of clips or captions (``item_id``, several
items per clip for several views): ``rows`` holds every item's 2-D array concatenated, ``offsets``
(n+1,) each item's rows, ``extra/*`` its scalars.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from models.hf_audio import pools_first
from utils.errors import ConfigError, DatasetError
from utils.stores import (
    AUDIO_COLUMNS,
    TEXT_COLUMNS,
    RowStore,
    audio_table,
    check_caption_embeddings,
    check_logmels,
    read_table,
    text_table,
)

if TYPE_CHECKING:
    from utils.config import Config

WRITER = "preprocessing/tower_stores.py (main.py runs it when a store is missing)"


def is_pretrained(tower: Any) -> bool:
    """Whether a tower config is one of the ``transformers`` towers (it names a model id)."""
    return hasattr(tower, "model_id")


def audio_store_settings(config: Config, train: bool) -> dict[str, Any]:
    """What the audio store of a split depends on (``train``: the training split, whose views are random)."""
    tower = config.model.audio_enc
    kind = "inputs" if tower.trainable else "outputs"
    if kind == "inputs":  # the extractor's output: the model id and how it extracts
        model = {k: v for k, v in tower.model_dump(mode="json").items() if k in ("name", "model_id", "fusion")}
    else:  # the backbone's output: everything about the backbone, and frames or one mean frame
        model = tower.model_dump(mode="json", exclude={"trainable", "adapter", "store"})
        model["pooled"] = pools_first(tower.adapter, config.model.pooling)
    crops = config.crops.model_dump(mode="json")
    views = {"seconds": crops["seconds"], "pad": crops["pad"]}
    if crops["seconds"] is not None:
        views |= {"train_views": crops["train_views"]} if train else {"eval_hop_seconds": crops["eval_hop_seconds"]}
    return {"kind": kind, "model": model, "views": views, "max_seconds": config.features.max_seconds}


def text_store_settings(config: Config) -> dict[str, Any]:
    """What a frozen text tower's caption vectors depend on."""
    tower = config.model.text_enc.model_dump(mode="json", exclude={"trainable", "store"})
    return {"kind": "text_outputs", "model": tower, "caption_column": config.text_embeddings.caption_column}


def store_path(dataset_dir: Path, split: str, tower: Any, settings: dict[str, Any]) -> Path:
    """``{split}_{store}.h5`` for a tower with a ``store`` name; else ``{split}_{Tower}_{kind}_{digest}.h5``,
    the digest of the settings, so that variants (another layer, other crops) each get their own store."""
    if tower.store:
        return Path(dataset_dir) / f"{split}_{tower.store}.h5"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path(dataset_dir) / f"{split}_{tower.name}_{settings['kind']}_{digest}.h5"


def audio_store(config: Config, split: str) -> tuple[Path, dict[str, Any]] | None:
    """The audio store ``split`` needs and its settings; None when the audio tower reads log-mels."""
    tower = config.model.audio_enc
    if not is_pretrained(tower):
        return None
    settings = audio_store_settings(config, split == config.data.train_split)
    return store_path(config.data.dataset_dir, split, tower, settings), settings


def text_store(config: Config, split: str) -> tuple[Path, dict[str, Any]] | None:
    """The text store ``split`` needs and its settings; None unless the text tower is frozen ``transformers``."""
    tower = config.model.text_enc
    if not is_pretrained(tower) or tower.trainable:
        return None
    settings = text_store_settings(config)
    return store_path(config.data.dataset_dir, split, tower, settings), settings


def source_ids(dataset_dir: Path, split: str, text: bool) -> tuple[list[int], list[str]]:
    """The clip ids and file names (or caption ids and captions) a store of ``split`` is made from."""
    if text:
        table = read_table(text_table(dataset_dir, split), TEXT_COLUMNS)
        return [int(c) for c in table["cid"]], [str(t) for t in table["raw_text"]]
    table = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)
    return [int(f) for f in table["fid"]], [str(f) for f in table["fname"]]


def store_problem(path: Path, settings: dict[str, Any], ids: list[int], names: list[str]) -> str | None:
    """Why the store at ``path`` is not the one wanted (missing, other settings, other sources), or None."""
    if not path.is_file():
        return "not found"
    try:
        with h5py.File(path, "r") as f:
            made_with = json.loads(f.attrs["settings"])
            same_sources = f["source_id"][:].tolist() == ids and f["source_name"].asstr()[:].tolist() == names
    except (OSError, KeyError, ValueError):
        return "not a complete tower store"
    if made_with != settings:
        changed = [
            f"{key} {made_with.get(key)!r} in the store, {value!r} in the config"
            for key, value in settings.items()
            if made_with.get(key) != value
        ]
        return f"made with other settings ({'; '.join(changed)})"
    if not same_sources:
        return "made from another clip or caption list"
    return None


def check_store(path: Path, settings: dict[str, Any], ids: list[int], names: list[str]) -> None:
    """A ``DatasetError`` unless the store at ``path`` is complete and current."""
    problem = store_problem(path, settings, ids, names)
    if problem == "not found":
        raise DatasetError(f"{path} not found; run {WRITER}")
    if problem:
        raise DatasetError(
            f"{path}: {problem}; rerun preprocessing/tower_stores.py with --overwrite, or give the tower "
            "another `store` name to keep both"
        )


def missing_stores(config: Config, splits: list[str]) -> list[tuple[str, str, Path]]:
    """``(split, "audio" or "text", path)`` of each tower store that does not exist yet (stale ones are
    ``check_store``'s errors)."""
    found = []
    for split in splits:
        for side, store in (("audio", audio_store(config, split)), ("text", text_store(config, split))):
            if store is not None and not store[0].is_file():
                found.append((split, side, store[0]))
    return found


def check_tower_stores(config: Config, split: str, missing_ok: bool = False) -> None:
    """Refuse a split whose tower stores are missing (unless ``missing_ok``: they are still to be made) or out of
    step with the config or its tables."""
    for store, text in ((audio_store(config, split), False), (text_store(config, split), True)):
        if store is not None and not (missing_ok and not store[0].is_file()):
            check_store(*store, *source_ids(config.data.dataset_dir, split, text))


def open_store(path: Path) -> RowStore:
    """A tower store for reading; a missing one names the command that writes it."""
    return RowStore(path, WRITER)


def check_inputs(config: Config, split: str, missing_ok: bool = False) -> None:
    """Refuse a split whose stores, whichever the config's towers read, are missing or out of step with the
    config or the split's tables: log-mels, Sentence-BERT caption embeddings, tower stores (which may be
    missing with ``missing_ok``)."""
    data = config.data
    if not is_pretrained(config.model.audio_enc):
        check_logmels(data.dataset_dir, split, config.features)
    if not is_pretrained(config.model.text_enc):
        check_caption_embeddings(data.dataset_dir, split, config.text_embeddings)
    check_tower_stores(config, split, missing_ok)


def extra_sources(config: Config) -> list[Config]:
    """One config per ``data.extra_train`` entry: its folder as ``data.dataset_dir`` and its split as the training
    split (with no sources of its own), so that whatever takes a config and a split reads that dataset's tables
    and stores, with the same features and towers. A folder or split that is not there is a ``ConfigError``."""
    sources = []
    for i, source in enumerate(config.data.extra_train):
        folder, split = source.dataset_dir, source.split
        if not folder.is_dir():
            raise ConfigError(f"data.extra_train[{i}].dataset_dir: {folder} does not exist or is not a folder")
        if not (folder / split).is_dir() and not audio_table(folder, split).is_file():
            raise ConfigError(
                f"data.extra_train[{i}].split: {folder} has neither a {split}/ folder nor {split}_audio.csv"
            )
        data = config.data.model_copy(update={"dataset_dir": folder, "train_split": split, "extra_train": []})
        sources.append(config.model_copy(update={"data": data}))
    return sources
