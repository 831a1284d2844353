"""Embedding a whole split with a trained model: every clip and caption once, then their scores."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.dual_encoder import DualEncoderModel
from models.pooling import masked_mean
from utils.audio import clip_views, load_audio, logmel
from utils.checkpoints import load_trained_model
from utils.config import Config
from utils.data import audio_source, pad_logmels, text_source, to_device, usable_captions
from utils.extractors import CaptionTokens, make_extractor
from utils.runtime import resolve_device
from utils.stores import AUDIO_COLUMNS, audio_table, read_table
from utils.text import load_sentence_model
from utils.tower_stores import is_pretrained

TEXT_BATCH = 1024  # captions per text-tower call for precomputed vectors: a projection, cheap at any width
# the Sentence-BERT model that queries go through, loaded once per process (a search app embeds every query)
cached_sentence_model = functools.lru_cache(maxsize=1)(load_sentence_model)


@dataclass
class AudioEmbeddings:
    """The audio side of pair scoring for n clips (``DualEncoderModel.audio_frames``): ``frames`` ``(n, T, E)``
    and valid counts ``lengths`` ``(n,)``; one unit vector per clip (T = 1) unless the pooling head is
    text-aware, which pools each clip's projected frames per caption."""

    frames: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, index: list[int]) -> AudioEmbeddings:
        """The clips at ``index``, cut to their own longest."""
        lengths = self.lengths[index]
        return AudioEmbeddings(self.frames[index, : int(lengths.max()) if len(index) else 1], lengths)

    def to(self, device: torch.device) -> AudioEmbeddings:
        return AudioEmbeddings(self.frames.to(device), self.lengths.to(device))

    def pooled(self) -> torch.Tensor:
        """``(n, E)`` unit vectors, each clip's normalised mean frame: a clip's own vector when T = 1, and for a
        text-aware head's frames the caption-free summary that a search shortlists clips by."""
        return F.normalize(masked_mean(self.frames, self.lengths), dim=-1)

    @staticmethod
    def of_views(model: DualEncoderModel, views: list[torch.Tensor], clip: list[int], n: int) -> AudioEmbeddings:
        """Each clip from its views' valid frames ``(T_v, E)`` (``clip[v]``: view v's clip, of ``n``): the normalised
        mean of its views' vectors, or for a text-aware head all its views' frames in order."""

        def per_clip_sum(values: torch.Tensor) -> torch.Tensor:  # (n_views, ...) -> (n, ...)
            return torch.zeros(n, *values.shape[1:]).index_add_(0, torch.tensor(clip), values)

        if model.sequence:  # each clip the mean of its views' sequences (L, E)
            counts = per_clip_sum(torch.ones(len(clip)))
            seqs = per_clip_sum(torch.stack(views)) / counts[:, None, None]
            return AudioEmbeddings(seqs, torch.full((n,), seqs.size(1)))
        if not model.text_aware:  # one frame per view: the normalised sum is the normalised mean
            vectors = per_clip_sum(torch.cat(views))
            return AudioEmbeddings(F.normalize(vectors, dim=-1)[:, None], torch.ones(n, dtype=torch.long))
        per_clip: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for row, frames in zip(clip, views):
            per_clip[row].append(frames)
        return AudioEmbeddings.cat(
            [AudioEmbeddings(torch.cat(f)[None], torch.tensor([sum(map(len, f))])) for f in per_clip]
        )

    @staticmethod
    def cat(parts: list[AudioEmbeddings]) -> AudioEmbeddings:
        """Concatenate, padding frames to the longest clip."""
        steps = max(part.frames.size(1) for part in parts)
        frames = [F.pad(part.frames, (0, 0, 0, steps - part.frames.size(1))) for part in parts]
        return AudioEmbeddings(torch.cat(frames), torch.cat([part.lengths for part in parts]))


@dataclass
class SplitEmbeddings:
    """Every clip and caption of a split in the shared space.

    Row i of ``text`` describes clip ``caption_audio[i]`` of ``audio``.
    """

    fnames: list[str]  # (n_audio,)
    audio: AudioEmbeddings  # n_audio clips
    captions: list[str]  # (n_captions,)
    text: torch.Tensor  # (n_captions, E)
    caption_audio: torch.Tensor  # (n_captions,) long
    score: Callable[[AudioEmbeddings, torch.Tensor], torch.Tensor]  # score_pairs with the model that embedded them
    fids: np.ndarray | None = None  # (n_audio,) the clips' ids in the split's tables, when read from them
    cids: np.ndarray | None = None  # (n_captions,) the captions' ids

    def scores(self) -> torch.Tensor:
        """Cosine similarity ``(n_audio, n_captions)`` of every pair (chunked through a text-aware head)."""
        return self.score(self.audio, self.text)


@torch.no_grad()
def score_pairs(
    model: DualEncoderModel, device: torch.device, audio: AudioEmbeddings, text: torch.Tensor
) -> torch.Tensor:
    """Cosine scores ``(n_audio, n_captions)`` on the CPU of ``audio`` and ``text`` ``(n_captions, E)``, computed on
    ``device`` by the model's ``score_all``."""
    model.eval()
    audio = audio.to(device)
    return model.score_all(audio.frames, audio.lengths, text.to(device)).cpu()


def embed_views(model: DualEncoderModel, batch: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A batch of audio views -> each view's valid ``audio_frames`` ``(T_v, E)``, on the CPU."""
    frames, lengths = model.audio_frames(**to_device(batch, device))
    return [f[:n] for f, n in zip(frames.cpu(), lengths.tolist())]


@torch.no_grad()
def encode_split(
    model: DualEncoderModel, config: Config, split: str, device: torch.device, batch_size: int = 32
) -> SplitEmbeddings:
    """Encode each clip and each caption of ``split`` exactly once, in batches, in inference mode. A clip
    seen through several views (sliding windows, stored crops) is the normalised mean of their embeddings
    (for a text-aware head: the frames of all its views)."""
    model.eval()  # dropout off, BatchNorm running statistics
    dataset_dir = config.data.dataset_dir
    audio_rows = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)
    source = audio_source(config, split)
    audio_rows = audio_rows[audio_rows["fid"].isin(source.fids)]
    fids = audio_rows["fid"].to_numpy(np.int64)
    views = [(row, view) for row, fid in enumerate(fids) for view in source.views(int(fid))]
    embeds = []
    for start in range(0, len(views), batch_size):
        embeds += embed_views(model, source.collate([view for _, view in views[start : start + batch_size]]), device)
    audio = AudioEmbeddings.of_views(model, embeds, [row for row, _ in views], len(fids))

    text = text_source(config, split)
    row_of_fid = {int(f): i for i, f in enumerate(fids)}
    text_rows = usable_captions(config, split, source, text)
    captions = text_rows[config.text_embeddings.caption_column].astype(str).tolist()
    items = [text.get(int(c), caption) for c, caption in zip(text_rows["cid"], captions)]
    step = TEXT_BATCH if text.cids is not None else batch_size  # vectors, or a text transformer per batch
    text_embeds = [
        model.encode_text(**to_device(text.collate(items[s : s + step]), device)).cpu()
        for s in range(0, len(items), step)
    ]
    return SplitEmbeddings(
        fnames=audio_rows["fname"].tolist(),
        audio=audio,
        captions=text_rows["raw_text"].tolist(),
        text=torch.cat(text_embeds),
        caption_audio=torch.tensor([row_of_fid[int(f)] for f in text_rows["fid"]], dtype=torch.long),
        score=functools.partial(score_pairs, model, device),
        fids=fids,
        cids=text_rows["cid"].to_numpy(np.int64),
    )


def load_for_inference(path: Path, device: str | None = None) -> tuple[DualEncoderModel, Config, torch.device]:
    """The trained model of an export folder or checkpoint with its frozen backbones (new audio and text go through
    the whole towers), its config, and the device it was moved to (``device``, default: its config's)."""
    model, config = load_trained_model(path, torch.device("cpu"), backbones=True)
    target = resolve_device(device or config.device)
    return model.to(target), config, target


def audio_file_encoder(
    model: DualEncoderModel, config: Config, device: torch.device
) -> Callable[[Path], list[torch.Tensor]]:
    """A function from one new audio file to its evaluation views' ``audio_frames`` ``(T_v, E)`` (on the CPU): the
    file decoded and seen as the config's evaluation views, through log-mels for a CNN or the tower's own extractor
    for a ``transformers`` tower, whose backbone the model must hold. Unusable files raise ``AudioError``."""
    model.eval()
    tower = config.model.audio_enc
    extractor = make_extractor(tower) if is_pretrained(tower) else None
    rate = extractor.sample_rate if extractor else config.features.sample_rate

    @torch.no_grad()
    def encode(path: Path) -> list[torch.Tensor]:
        wave = load_audio(path, rate, config.features.max_seconds)
        if extractor is None:
            frames = logmel(wave, config.features, name=str(path))
            views = clip_views(frames, 1000 / config.features.hop_ms, config.crops, False, np.random.default_rng(0))
            logmels, lengths = pad_logmels(views)
            batch = {"logmels": logmels, "lengths": lengths}
        else:
            views = clip_views(wave, rate, config.crops, False, np.random.default_rng(0))
            batch = extractor.collate([extractor.extract(view, seed=k, train=False) for k, view in enumerate(views)])
        return embed_views(model, batch, device)

    return encode


@torch.no_grad()
def encode_audio_files(
    model: DualEncoderModel, config: Config, paths: list[Path], device: torch.device
) -> AudioEmbeddings:
    """New audio files -> their ``AudioEmbeddings`` (each file as ``audio_file_encoder`` sees it), the views
    combined as in ``encode_split``."""
    encode = audio_file_encoder(model, config, device)
    embeds, clip = [], []
    for row, path in enumerate(paths):
        views = encode(path)
        embeds += views
        clip += [row] * len(views)
    return AudioEmbeddings.of_views(model, embeds, clip, len(paths))


@torch.no_grad()
def encode_captions(model: DualEncoderModel, config: Config, captions: list[str], device: torch.device) -> torch.Tensor:
    """New captions (written as people write them) -> ``(n, E)``, in the form the model was trained on: the
    config's caption column, then Sentence-BERT or the text tower's own tokenizer (and backbone)."""
    model.eval()
    embedded = [config.text_embeddings.caption(c) for c in captions]
    tower = config.model.text_enc
    if is_pretrained(tower):
        return model.encode_text(**to_device(CaptionTokens(tower)(embedded), device))
    sentence_model = cached_sentence_model(config.text_embeddings.model_name, device)
    return model.encode_text(torch.from_numpy(sentence_model.encode(embedded, convert_to_numpy=True)).to(device))
