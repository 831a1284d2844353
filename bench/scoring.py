"""Scoring every (clip, caption) pair of a split, batched and chunked, against scoring the pairs one by one.

(a) Text-aware attention pooling (TAP) at the Clotho evaluation size (1,045 clips x 5,225 captions): a tiny TAP
model's ``score_all`` (chunks of pairs whose intermediates stay within the head's ``chunk_mb``) on random projected
frames, its peak memory read from the profiler's allocation records, against ``pair_scores`` called pair by pair.
(b) A whole split end to end as ``postprocessing/xmodal_scores.py`` scores it (``utils.inference``'s
``embed_views``, ``AudioEmbeddings.of_views`` and ``score_pairs``) followed by ``retrieval_metrics``: a random
tiny CNN on generated log-mels and caption vectors held in memory, against running the audio and the text tower
once per (clip, caption) pair and scoring that pair, as the DCASE baseline's evaluation did.
The pair-by-pair baselines run on a sample of pairs and are extrapolated to the whole split; each is checked to
give the same scores as the batched path on its sample.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import Row, Timing, measure, seconds
from models.dual_encoder import DualEncoderModel, create_model
from utils.data import pad_logmels
from utils.inference import AudioEmbeddings, embed_views, score_pairs
from utils.metrics import retrieval_metrics

CAPTIONS_PER_CLIP = 5
N_MELS, TEXT_DIM = 64, 384  # conf.yaml's features.n_mels; all-MiniLM-L6-v2's width
EMBED_DIM = 16  # the tiny CNN trials' model.embed_dim (bench/many_trials.py's TINY_CNN)
MAX_FRAMES = 32  # TAP frames per clip (the CNN's output steps), lengths drawn from 16..32
CHUNK_MB = (32.0, 256.0)  # the head's chunk budgets measured, the default (256) last
MB = 2**20
CPU = torch.device("cpu")


def tiny_model(tap: bool, chunk_mb: float = 256.0) -> DualEncoderModel:
    """A random tiny model built from its config as the registry builds it: a two-block CNN, precomputed caption
    vectors, ``EMBED_DIM``-wide space, TAP or the CNN's own pooling; in inference mode."""
    torch.manual_seed(0)
    config = DualEncoderModel.Config.model_validate(
        {
            "embed_dim": EMBED_DIM,
            "audio_enc": {"name": "SmallCNNEncoder", "channels": [4, 8], "out_dim": EMBED_DIM},
            "text_enc": {"name": "SentBERTBaseEncoder"},
            "pooling": {"name": "TextAwareAttentionPooling", "chunk_mb": chunk_mb} if tap else None,
        }
    )
    return create_model(config, n_mels=N_MELS, text_dim=TEXT_DIM).eval()


def peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes held at once by tensors allocated while ``fn()`` runs, from the profiler's allocation and
    release records (each op's own net allocation, in time order)."""
    # the autograd profiler directly: torch.profiler's front end imports torch._dynamo on entry (seconds)
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    events = sorted(prof.function_events, key=lambda event: event.time_range.start)
    held = np.cumsum([event.self_cpu_memory_usage for event in events])
    return int(held.max(initial=0))


def sample_pairs(n_audio: int, n_text: int, k: int) -> list[tuple[int, int]]:
    """``k`` random (clip, caption) pairs of a ``n_audio x n_text`` split."""
    rng = np.random.default_rng(0)
    return list(zip(rng.integers(n_audio, size=k).tolist(), rng.integers(n_text, size=k).tolist()))


@torch.no_grad()
def chunked_row(
    chunk_mb: float, frames: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor, quick: bool
) -> tuple[Row, Timing]:
    """TAP ``score_all`` of ``frames`` ``(B_a, T, E)`` with ``lengths`` ``(B_a,)`` against unit captions ``(B_t, E)``
    with the head's ``chunk_mb``: its time and its peak memory beyond the score matrix."""
    model = tiny_model(tap=True, chunk_mb=chunk_mb)
    n_audio, n_text = len(frames), len(text)
    clips, captions = model.pooling.chunk_sizes(n_audio, n_text, frames.size(1))
    result = n_audio * n_text * 4  # the float32 score matrix itself, allocated whatever the chunk
    peak = peak_bytes(lambda: model.score_all(frames, lengths, text)) - result  # also the warm-up
    fast = measure(lambda: model.score_all(frames, lengths, text), repeats=2, warmup=0)
    unchunked = n_audio * n_text * 4 * (2 * frames.size(1) + 3 * frames.size(2))  # chunk_sizes's per-pair bytes
    return Row(
        what=f"TAP pair scoring (score_all), {n_audio:,} x {n_text:,}, chunk_mb {chunk_mb:g}",
        figure=f"{fast}; peak beyond the scores {peak / MB:.1f} MB",
        target=f"memory bounded by the chunk ({chunk_mb:g} MB)",
        met=peak <= chunk_mb * MB,
        note=(
            f"chunks of {clips} clips x {captions} captions; E={EMBED_DIM}, up to {MAX_FRAMES} frames per clip; peak "
            "= most bytes held at once by tensors allocated during one call (torch profiler), less the "
            f"{result / MB:.1f} MB score matrix; unchunked the pairs' intermediates would be about "
            f"{unchunked / MB:,.0f} MB"
        ),
    ), fast


@torch.no_grad()
def tap_rows(quick: bool) -> list[Row]:
    """(a): TAP ``score_all`` of the whole split at two chunk budgets, against ``pair_scores`` pair by pair."""
    n_audio = 60 if quick else 1045
    n_text = n_audio * CAPTIONS_PER_CLIP
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(n_audio, MAX_FRAMES, EMBED_DIM, generator=generator)  # projected frames (B_a, T, E)
    lengths = torch.randint(MAX_FRAMES // 2, MAX_FRAMES + 1, (n_audio,), generator=generator)
    text = F.normalize(torch.randn(n_text, EMBED_DIM, generator=generator), dim=-1)  # unit captions (B_t, E)
    rows, timings = zip(*(chunked_row(chunk_mb, frames, lengths, text, quick) for chunk_mb in CHUNK_MB))
    model = tiny_model(tap=True)  # the default chunk_mb, the last measured
    scores = model.score_all(frames, lengths, text)
    pairs = sample_pairs(n_audio, n_text, 50 if quick else 2000)

    def pair_by_pair() -> list[torch.Tensor]:
        return [
            model.pair_scores(frames[a : a + 1, : lengths[a]], lengths[a : a + 1], text[t : t + 1]) for a, t in pairs
        ]

    slow = measure(pair_by_pair, repeats=2 if quick else 3, warmup=1)
    one_by_one = torch.cat([s.flatten() for s in pair_by_pair()])
    if not torch.allclose(one_by_one, scores[tuple(torch.tensor(pairs).T)], atol=1e-5):
        raise AssertionError("TAP pair-by-pair scores disagree with score_all")
    n_pairs, fast = n_audio * n_text, timings[-1].min_s
    whole = slow.min_s * n_pairs / len(pairs)
    return [
        *rows,
        Row(
            what=f"TAP pair scoring, pair by pair, {n_audio:,} x {n_text:,}",
            figure=f"{seconds(whole)} extrapolated",
            against=f"score_all (chunk_mb {CHUNK_MB[-1]:g}): {seconds(fast)}",
            ratio=f"score_all {whole / fast:,.0f}x faster",
            note=f"pair_scores on one pair at a time, timed on {len(pairs):,} random pairs ({slow}) and scaled to "
            f"{n_pairs:,}; checked equal to score_all on them",
        ),
    ]


@torch.no_grad()
def split_rows(quick: bool) -> list[Row]:
    """(b): embedding, scores and metrics of a whole split against both towers run once per pair."""
    n_audio, frames = (8, (50, 100)) if quick else (300, (250, 500))
    rng = np.random.default_rng(0)
    # clips of 5 to 10 s at 20 ms hops (quick: 1 to 2 s)
    logmels = [rng.standard_normal((int(n), N_MELS), dtype=np.float32) for n in rng.integers(*frames, n_audio)]
    caption_audio = torch.arange(n_audio).repeat_interleave(CAPTIONS_PER_CLIP)
    vectors = torch.from_numpy(rng.standard_normal((len(caption_audio), TEXT_DIM), dtype=np.float32))
    model = tiny_model(tap=False)
    batch_size = 32  # conf.yaml's param_conf.batch_size, which xmodal_scores embeds with

    def whole_split() -> tuple[torch.Tensor, dict]:
        views: list[torch.Tensor] = []
        for start in range(0, n_audio, batch_size):
            logmel, length = pad_logmels(logmels[start : start + batch_size])
            views += embed_views(model, {"logmels": logmel, "lengths": length}, CPU)
        audio = AudioEmbeddings.of_views(model, views, list(range(n_audio)), n_audio)
        scores = score_pairs(model, CPU, audio, model.encode_text(vectors))
        return scores, retrieval_metrics(scores, caption_audio)

    scores, _ = whole_split()  # also the warm-up
    fast = measure(whole_split, repeats=1 if quick else 3, warmup=0)
    pairs = sample_pairs(n_audio, len(caption_audio), 4 if quick else 60)

    def pair_by_pair() -> list[torch.Tensor]:
        out = []
        for a, t in pairs:
            logmel, length = pad_logmels([logmels[a]])
            frames, lengths = model.audio_frames(logmels=logmel, lengths=length)
            out.append(model.pair_scores(frames, lengths, model.encode_text(vectors[t : t + 1])))
        return out

    slow = measure(pair_by_pair, repeats=1 if quick else 2, warmup=1)
    one_by_one = torch.cat([s.flatten() for s in pair_by_pair()])
    if not torch.allclose(one_by_one, scores[tuple(torch.tensor(pairs).T)], atol=1e-5):
        raise AssertionError("per-pair scores of the split disagree with the batched ones")
    n_pairs = n_audio * len(caption_audio)
    whole = slow.min_s * n_pairs / len(pairs)
    return [
        Row(
            what=f"scoring a whole split (embedding + scores + metrics), {n_audio} clips x {len(caption_audio):,} "
            "captions",
            figure=str(fast),
            against=f"each pair separately (both towers per pair): {seconds(whole)} extrapolated",
            ratio=f"{whole / fast.min_s:,.0f}x faster",
            target="ratio reported",
            note=(
                f"random SmallCNNEncoder [4, 8] -> {EMBED_DIM}, mean+max pooling; generated log-mels of "
                f"{frames[0] // 50}-{frames[1] // 50} s ({N_MELS} mels, 20 ms hops) and {TEXT_DIM}-d caption vectors "
                f"in memory (no HDF5 reads), batches of {batch_size} clips; per pair timed on {len(pairs)} random "
                f"pairs ({slow}) and scaled to {n_pairs:,}, checked equal to the batched scores"
            ),
        )
    ]


def run(quick: bool) -> list[Row]:
    """The TAP rows (a) and the whole-split row (b)."""
    return tap_rows(quick) + split_rows(quick)
