"""Batches of (clip, caption) pairs for training, validation and scoring: the torch side of the stores.

What a tower reads depends on the tower (``audio_source``, ``text_source``):

- audio: padded log-mels for the CNNs (``LogmelSource``), or for a ``transformers`` tower one stored view
  per draw of its model inputs or of its frozen backbone's outputs (``StoredViews``);
- text: precomputed caption vectors (Sentence-BERT's, or a frozen tower's: ``CaptionVectors``) or
  captions tokenised here, in the data loader (``CaptionTokenSource``).

A batch is ``{"audio": {...}, "text": {...}, "audio_ids": (B,), "caption_ids": (B,)}``; the two inner dicts are
the towers' keyword inputs (``DualEncoderModel.forward``). Training reads the training split of
``data.dataset_dir`` and of every ``data.extra_train`` source (``TrainingPairs``), each from its own stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from models.text_encoders import TEXT_ENCODERS
from utils.audio import CropConfig, clip_views
from utils.config import Config
from utils.extractors import CaptionTokens, make_extractor
from utils.stores import (
    TEXT_COLUMNS,
    LogmelStore,
    logmel_file,
    read_table,
    read_text_embeds,
    text_embeds_file,
    text_table,
)
from utils.tower_stores import audio_store, extra_sources, is_pretrained, open_store, text_store


def pad_logmels(logmels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(T_i, n_mels)`` arrays to ``(B, max T, n_mels)``; also returns lengths ``(B,)``."""
    lengths = torch.tensor([m.shape[0] for m in logmels], dtype=torch.long)
    batch = torch.zeros(len(logmels), int(lengths.max()), logmels[0].shape[1])
    for i, m in enumerate(logmels):
        batch[i, : m.shape[0]] = torch.from_numpy(np.asarray(m, dtype=np.float32))
    return batch, lengths


class LogmelSource:
    """Log-mels of ``{split}_logmel.h5``: the whole clip, or crops (``CropConfig``): in training a fresh random
    crop per draw (``train_views: 0``) or one of K drawn once per clip; in evaluation the centred crop or
    sliding windows."""

    def __init__(self, path: Path, hop_ms: float, crops: CropConfig, train: bool) -> None:
        self.store, self.crops, self.train = LogmelStore(path), crops, train
        self.frames_per_second = 1000 / hop_ms
        self.fids = set(self.store.row_of)

    def sample(self, fid: int, rng: np.random.Generator) -> np.ndarray:
        if not self.train or self.crops.seconds is None:
            return self.views(fid)[0]
        if self.crops.train_views == 0:
            return clip_views(self.store[fid], self.frames_per_second, self.crops, True, rng)[0]
        views = self.views(fid)  # drawn once per clip: seeded by it
        return views[rng.integers(len(views))]

    def views(self, fid: int) -> list[np.ndarray]:
        rng = np.random.default_rng(fid)
        return clip_views(self.store[fid], self.frames_per_second, self.crops, self.train, rng)

    def collate(self, items: list[np.ndarray]) -> dict[str, torch.Tensor]:
        logmels, lengths = pad_logmels(items)
        return {"logmels": logmels, "lengths": lengths}


def collate_frames(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Cached backbone frames ``(T'_i, D)`` -> ``frames`` ``(B, max T', D)`` zero-padded, ``lengths`` ``(B,)``."""
    frames, lengths = pad_logmels([item["rows"] for item in items])
    return {"frames": frames, "lengths": lengths}


class StoredViews:
    """A ``transformers`` audio tower's store: model inputs (batched by the tower's extractor) or a frozen
    backbone's outputs; one of a clip's stored views per training draw, all of them for evaluation."""

    def __init__(self, path: Path, collate: Any, train: bool = True) -> None:
        self.store, self.collate, self.train = open_store(path), collate, train
        self.fids = set(self.store.items_of)

    def sample(self, fid: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        items = self.store.items_of[fid]
        if not self.train:  # the validation loss sees the same view of a clip every epoch
            return self.store.item(items[0])
        return self.store.item(items[rng.integers(len(items))] if len(items) > 1 else items[0])

    def views(self, fid: int) -> list[dict[str, np.ndarray]]:
        return [self.store.item(i) for i in self.store.items_of[fid]]


AudioSource = LogmelSource | StoredViews


def audio_source(config: Config, split: str) -> AudioSource:
    """What the config's audio tower reads for ``split`` (the training split draws random views)."""
    train = split == config.data.train_split
    store = audio_store(config, split)
    if store is None:
        return LogmelSource(logmel_file(config.data.dataset_dir, split), config.features.hop_ms, config.crops, train)
    path, settings = store
    collate = make_extractor(config.model.audio_enc).collate if settings["kind"] == "inputs" else collate_frames
    return StoredViews(path, collate, train)


class CaptionVectors:
    """Precomputed caption vectors by caption id: Sentence-BERT's (``{split}_text_embeds.h5``) or a frozen
    ``transformers`` text tower's."""

    def __init__(self, cids: np.ndarray, vectors: np.ndarray) -> None:
        self.vectors = vectors
        self.row_of = {int(c): i for i, c in enumerate(cids)}
        self.cids = set(self.row_of)

    def get(self, cid: int, caption: str) -> np.ndarray:
        return self.vectors[self.row_of[cid]]

    def collate(self, items: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"text_embeds": torch.from_numpy(np.stack(items))}


class CaptionTokenSource:
    """Captions as written in the config's caption column, tokenised per batch by the text tower's tokenizer."""

    cids = None  # every caption of the table

    def __init__(self, tokens: CaptionTokens) -> None:
        self.tokens = tokens

    def get(self, cid: int, caption: str) -> str:
        return caption

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        return self.tokens(items)


class CaptionSequences(CaptionVectors):
    """A frozen sequence tower's stored hidden states (``CLIPTextEncoder``: ``(L, W)`` per caption, batched to
    ``(B, L, W)``), read per caption: a split's targets can be gigabytes."""

    def __init__(self, path: Path) -> None:
        self.store = open_store(path)
        super().__init__(self.store.ids, np.empty(0))

    def get(self, cid: int, caption: str) -> np.ndarray:
        return np.asarray(self.store.rows(self.row_of[cid]), dtype=np.float32)


TextSource = CaptionVectors | CaptionTokenSource | CaptionSequences


def text_source(config: Config, split: str) -> TextSource:
    """What the config's text tower reads for ``split``."""
    tower = config.model.text_enc
    if is_pretrained(tower) and tower.trainable:
        return CaptionTokenSource(CaptionTokens(tower))
    store = text_store(config, split)
    if store is None:
        cids, vectors, _ = read_text_embeds(text_embeds_file(config.data.dataset_dir, split))
        return CaptionVectors(cids, vectors)
    if TEXT_ENCODERS.get(tower.name).sequence:  # (L, W) per caption
        return CaptionSequences(store[0])
    rows = open_store(store[0])
    return CaptionVectors(rows.ids, rows.read_all().astype(np.float32))  # one row per caption, in item order


def usable_captions(config: Config, split: str, audio: AudioSource, text: TextSource) -> pd.DataFrame:
    """The rows of ``{split}_text.csv`` whose clip ``audio`` has and whose vector ``text`` has (a source of
    tokens has every caption): preprocessing may have dropped some."""
    table = read_table(text_table(config.data.dataset_dir, split), TEXT_COLUMNS)
    keep = table["fid"].isin(audio.fids)
    if text.cids is not None:
        keep &= table["cid"].isin(text.cids)
    return table[keep]


class CaptionPairs(Dataset):
    """One item per caption of ``split``: ``(audio item, text item, clip id, caption id)``, the clip id being the
    clip's ``fid`` plus ``id_offset``; captions whose clip or vector is missing from the stores (dropped by
    preprocessing) are left out, so they cannot crash training."""

    def __init__(self, config: Config, split: str, id_offset: int = 0) -> None:
        self.audio, self.text = audio_source(config, split), text_source(config, split)
        table = usable_captions(config, split, self.audio, self.text)
        self.id_offset = id_offset
        self.fids = table["fid"].to_numpy(np.int64)
        self.cids = table["cid"].to_numpy(np.int64)
        self.captions = table[config.text_embeddings.caption_column].astype(str).tolist()
        self.rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.fids)

    def __getitem__(self, i: int) -> tuple[Any, Any, int, int]:
        if self.rng is None:  # per process: DataLoader workers get their own torch seeds
            self.rng = np.random.default_rng(torch.initial_seed() % 2**32)
        fid = int(self.fids[i])
        return (
            self.audio.sample(fid, self.rng),
            self.text.get(int(self.cids[i]), self.captions[i]),
            fid + self.id_offset,
            int(self.cids[i]),
        )

    def collate(self, items: list[tuple[Any, Any, int, int]]) -> dict[str, Any]:
        """Batch items into the towers' inputs, the clip ids ``(B,)`` and the caption ids ``(B,)`` (the split's
        ``cid``: what a teachers' store is keyed by)."""
        audio, text, fids, cids = zip(*items)
        return {
            "audio": self.audio.collate(list(audio)),
            "text": self.text.collate(list(text)),
            "audio_ids": torch.tensor(fids, dtype=torch.long),
            "caption_ids": torch.tensor(cids, dtype=torch.long),
        }


class TrainingPairs(ConcatDataset):
    """The training pairs of ``data.dataset_dir`` then of each ``data.extra_train`` source, one ``CaptionPairs``
    per dataset read from its own stores. Clip ids are offset per source, past the ids of the sources before it,
    so that two datasets' clips never share one: the loss takes rows with the same clip id as positives."""

    def __init__(self, config: Config) -> None:
        parts = [CaptionPairs(config, config.data.train_split)]
        for source in extra_sources(config):
            end = parts[-1].id_offset + max(parts[-1].audio.fids, default=-1) + 1  # past the last source's ids
            parts.append(CaptionPairs(source, source.data.train_split, id_offset=end))
        super().__init__(parts)
        self.collate = parts[0].collate  # every source feeds the same towers


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor, at any depth of its dicts, on ``device``."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def pair_loader(
    dataset: CaptionPairs | TrainingPairs,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader over caption pairs; shuffling is seeded so trials are reproducible.

    With ``world_size > 1`` each worker reads its own shard (``DistributedSampler``; shards are
    padded to equal length, so every worker runs the same number of equal-sized steps).
    """
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=dataset.collate, num_workers=num_workers
        )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        generator=generator,
    )
