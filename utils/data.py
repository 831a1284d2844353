"""Batches of (clip, caption) pairs for training and validation: the torch side of the stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.stores import (
    TEXT_COLUMNS,
    LogmelStore,
    logmel_file,
    read_table,
    read_text_embeds,
    text_embeds_file,
    text_table,
)


class CaptionPairs(Dataset):
    """One item per caption: ``(logmel (T, n_mels), text embedding (dim,), fid)``.

    Only captions whose clip has features are kept, so a clip dropped by preprocessing
    cannot crash training.
    """

    def __init__(self, dataset_dir: Path, split: str) -> None:
        self.logmels = LogmelStore(logmel_file(dataset_dir, split))
        cids, embeds, self.text_model = read_text_embeds(text_embeds_file(dataset_dir, split))
        text = read_table(text_table(dataset_dir, split), TEXT_COLUMNS)
        row_of_cid = {int(c): i for i, c in enumerate(cids)}
        keep = text["fid"].isin(self.logmels.row_of) & text["cid"].isin(row_of_cid)
        text = text[keep]
        self.fids = text["fid"].to_numpy(np.int64)
        self.embeds = embeds[[row_of_cid[int(c)] for c in text["cid"]]]
        self.text_dim = int(embeds.shape[1])
        self.n_mels = self.logmels.n_mels

    def __len__(self) -> int:
        return len(self.fids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        fid = int(self.fids[i])
        return self.logmels[fid], self.embeds[i], fid


def pad_logmels(logmels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(T_i, n_mels)`` arrays to ``(B, max T, n_mels)``; also returns lengths ``(B,)``."""
    lengths = torch.tensor([m.shape[0] for m in logmels], dtype=torch.long)
    batch = torch.zeros(len(logmels), int(lengths.max()), logmels[0].shape[1])
    for i, m in enumerate(logmels):
        batch[i, : m.shape[0]] = torch.from_numpy(m)
    return batch, lengths


def collate_pairs(items: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """Batch ``CaptionPairs`` items into padded log-mels, lengths, text embeddings and clip ids."""
    logmels, embeds, fids = zip(*items)
    audio, lengths = pad_logmels(list(logmels))
    return {
        "logmels": audio,
        "lengths": lengths,
        "text_embeds": torch.from_numpy(np.stack(embeds)),
        "audio_ids": torch.tensor(fids, dtype=torch.long),
    }


def pair_loader(
    dataset: CaptionPairs,
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
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_pairs, num_workers=num_workers
        )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_pairs,
        num_workers=num_workers,
        generator=generator,
    )
