"""``utils.metrics.retrieval_metrics`` at the Clotho evaluation size (1,045 clips x 5,225 captions, five captions
per clip, both directions, every metric it reports) against per-query loops written from the definitions.

The loop ranks each query's items with a stable descending sort (ties broken by index, as the metrics break them)
and reads every metric off the ranks of its relevant items. Both paths get the same random score matrix; the loop
is checked once, on a small matrix, to give every metric the vectorised function gives.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import Row, measure, seconds
from utils.metrics import MAP_K, NDCG_KS, RECALL_KS, retrieval_metrics

CAPTIONS_PER_CLIP = 5
TARGET_S = 0.050


def ranked_metrics(scores: np.ndarray, relevant: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """The metrics of queries in rows of ``scores`` ``(n_query, n_item)`` with boolean ``relevant``, one query at a
    time: each metric of each query from the 1-based ranks of its relevant items, then the mean over queries; also
    each query's rank of its best-ranked relevant item ``(n_query,)``."""
    per_query: dict[str, list[float]] = {}
    first = []
    for query_scores, query_relevant in zip(scores, relevant):
        order = np.argsort(-query_scores, kind="stable")  # best first, ties in item order
        ranks = np.flatnonzero(query_relevant[order]) + 1  # (n_relevant,) 1-based, ascending
        n_relevant = len(ranks)
        values = {f"mAP@{MAP_K}": sum(hit / rank for hit, rank in enumerate(ranks[ranks <= MAP_K], 1)) / n_relevant}
        for k in RECALL_KS:
            values[f"R@{k}"] = np.sum(ranks <= k) / n_relevant
        for k in NDCG_KS:
            dcg = sum(1 / math.log2(rank + 1) for rank in ranks[ranks <= k])
            ideal = sum(1 / math.log2(position + 1) for position in range(1, min(n_relevant, k) + 1))
            values[f"NDCG@{k}"] = dcg / ideal
        for name, value in values.items():
            per_query.setdefault(name, []).append(float(value))
        first.append(ranks[0])
    out = {name: float(np.mean(values)) for name, values in per_query.items()}
    out["mean_rank"], out["median_rank"] = float(np.mean(first)), float(np.median(first))
    return out, np.asarray(first)


def loop_metrics(scores: np.ndarray, caption_audio: np.ndarray) -> dict[str, dict[str, float]]:
    """``retrieval_metrics`` query by query: ``scores`` ``(n_audio, n_captions)``, each caption's clip
    ``caption_audio`` ``(n_captions,)``."""
    relevant = caption_audio[None, :] == np.arange(len(scores))[:, None]  # (n_audio, n_captions)
    t2a, _ = ranked_metrics(scores.T, relevant.T)
    a2t, first = ranked_metrics(scores, relevant)
    return {"t2a": t2a, "a2t": a2t, "a2t_any": {f"R@{k}": float(np.mean(first <= k)) for k in RECALL_KS}}


def split_scores(n_audio: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scores ``(n_audio, 5 n_audio)`` and each caption's clip ``(5 n_audio,)``, the captions shuffled."""
    generator = torch.Generator().manual_seed(seed)
    caption_audio = torch.arange(n_audio).repeat_interleave(CAPTIONS_PER_CLIP)
    caption_audio = caption_audio[torch.randperm(len(caption_audio), generator=generator)]
    return torch.rand(n_audio, len(caption_audio), generator=generator), caption_audio


def check() -> None:
    """Every metric of the loop equals the vectorised one on a small split, or AssertionError."""
    scores, caption_audio = split_scores(40, seed=1)
    want = retrieval_metrics(scores, caption_audio)
    got = loop_metrics(scores.numpy(), caption_audio.numpy())
    for direction, values in want.items():
        for name, value in values.items():
            if not math.isclose(got[direction][name], value, rel_tol=1e-5, abs_tol=1e-6):
                raise AssertionError(f"per-query loop {direction} {name} = {got[direction][name]}, vectorised {value}")


def run(quick: bool) -> list[Row]:
    """One row: the vectorised metrics at the Clotho evaluation size (quick: 100 clips) against the loops."""
    check()
    n_audio = 100 if quick else 1045
    scores, caption_audio = split_scores(n_audio)
    fast = measure(lambda: retrieval_metrics(scores, caption_audio), repeats=3 if quick else 10, warmup=1)
    as_numpy = scores.numpy(), caption_audio.numpy()
    slow = measure(lambda: loop_metrics(*as_numpy), repeats=1 if quick else 3, warmup=0)
    met = fast.min_s <= TARGET_S
    note = (
        f"random scores, {CAPTIONS_PER_CLIP} captions per clip; t2a, a2t and a2t_any, every metric; "
        f"the loops over all {n_audio * (CAPTIONS_PER_CLIP + 1):,} queries (numpy, one stable sort each)"
    )
    if not met:
        note += (
            f"; {seconds(fast.min_s)} is {fast.min_s / TARGET_S:.1f}x the {seconds(TARGET_S)} target: each direction "
            f"still makes three passes over all {scores.numel():,} pairs (a top-k selection, and two comparisons with "
            "the best relevant score for the first relevant rank: those ranked above it and those tied with it), "
            "memory-bound; t2a selects down the columns of the matrix, about 3x slower than along its rows"
        )
    return [
        Row(
            what=f"retrieval_metrics, {n_audio:,} clips x {n_audio * CAPTIONS_PER_CLIP:,} captions",
            figure=str(fast),
            against=f"per-query loops: {slow}",
            ratio=f"{slow.min_s / fast.min_s:.0f}x faster",
            target=f"<= {seconds(TARGET_S)}",
            met=met,
            note=note,
        )
    ]
