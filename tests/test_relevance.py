"""Several relevant clips per caption (DCASE 2025): relevance tables and the metrics that read them, checked
against per-query definitions and a hand-computed example."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from utils.errors import DatasetError
from utils.metrics import MetricKs, relevant_per_caption, retrieval_metrics
from utils.relevance import read_relevance, relevance_matrix

KS = MetricKs(map=(10, 16), recall=(1, 5, 10), ndcg=(5, 10))


def plain_query(scores, grades, own, threshold):
    """One query's metrics from the definitions: its items ranked by a stable descending sort (ties in item
    order), ``grades`` (0: not judged) as NDCG gains, relevant: the pairing's items (``own``) and those whose
    grade reaches ``threshold``."""
    order = np.argsort(-scores, kind="stable")
    ranked = grades[order]
    relevant = (ranked >= threshold if threshold is not None else ranked > 0) | own[order]
    n_relevant = max(int(relevant.sum()), 1)
    out = {}
    for k in KS.map:  # DCASE 2025 baseline: precision at each relevant hit within the top k, over all relevant
        hits = np.flatnonzero(relevant[:k]) + 1  # 1-based ranks
        out[f"mAP@{k}"] = sum(i / rank for i, rank in enumerate(hits, start=1)) / n_relevant
    for k in KS.recall:
        out[f"R@{k}"] = relevant[:k].sum() / n_relevant
    ideal = np.sort(grades)[::-1]
    for k in KS.ndcg:
        dcg = sum(g / math.log2(p + 1) for p, g in enumerate(ranked[:k], start=1))
        out[f"NDCG@{k}"] = dcg / sum(g / math.log2(p + 1) for p, g in enumerate(ideal[:k], start=1))
    out["rank"] = int(np.flatnonzero(relevant)[0]) + 1
    out |= {f"any@{k}": float(relevant[:k].any()) for k in KS.recall}
    return out


def plain_metrics(scores, caption_audio, dense, threshold):
    """Both directions query by query; ``dense`` ``(n_audio, n_captions)`` grades, the pairing included."""
    own = caption_audio[None, :] == np.arange(scores.shape[0])[:, None]
    t2a = [plain_query(scores[:, c], dense[:, c], own[:, c], threshold) for c in range(scores.shape[1])]
    a2t = [plain_query(scores[a], dense[a], own[a], threshold) for a in range(scores.shape[0])]

    def mean(rows):
        out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "rank" and not k.startswith("any")}
        ranks = [r["rank"] for r in rows]
        return out | {"mean_rank": float(np.mean(ranks)), "median_rank": float(np.median(ranks))}

    return {
        "t2a": mean(t2a),
        "a2t": mean(a2t),
        "a2t_any": {f"R@{k}": float(np.mean([r[f"any@{k}"] for r in a2t])) for k in KS.recall},
    }


def random_split(seed, n_audio=30, graded=False, ties=False):
    """Scores, each caption's clip, and a sparse table of further relevant pairs (graded 1-3 or binary)."""
    rng = np.random.default_rng(seed)
    caption_audio = rng.permutation(np.repeat(np.arange(n_audio), 5))
    n_captions = caption_audio.size
    own = caption_audio[None, :] == np.arange(n_audio)[:, None]
    scores = rng.normal(size=(n_audio, n_captions)) + 1.5 * own
    if ties:
        scores = np.round(scores)
    extra = rng.random((n_audio, n_captions)) < 0.06  # about two more clips per caption
    values = rng.integers(1, 4, size=extra.sum()).astype(float) if graded else np.ones(extra.sum())
    table = torch.sparse_coo_tensor(np.stack(np.nonzero(extra)), values, (n_audio, n_captions), check_invariants=True)
    dense = np.zeros((n_audio, n_captions))
    dense[extra] = values
    dense[own] = max(values.max(), 1.0)  # a caption's own clip: the table's highest grade, at least 1
    return scores, caption_audio, table, dense


@pytest.mark.parametrize(
    ("seed", "graded", "threshold", "ties"),
    [
        (0, False, None, False),
        (1, True, None, False),
        (2, True, 2.0, False),
        (3, True, 2.0, True),
        (4, False, None, True),
    ],
)
def test_relevance_metrics_equal_per_query_definitions(seed, graded, threshold, ties):
    scores, caption_audio, table, dense = random_split(seed, graded=graded, ties=ties)
    fast = retrieval_metrics(scores, caption_audio, table, threshold=threshold, ks=KS)
    plain = plain_metrics(scores, caption_audio, dense, threshold)
    for direction, values in plain.items():
        assert set(fast[direction]) == set(values)
        for name, value in values.items():
            assert fast[direction][name] == pytest.approx(value, abs=1e-5), (direction, name)


def test_without_a_table_nothing_changes():
    scores, caption_audio, _, _ = random_split(5)
    pairing = torch.sparse_coo_tensor(
        np.stack([caption_audio, np.arange(caption_audio.size)]),
        np.ones(caption_audio.size),
        scores.shape,
        check_invariants=True,
    )
    # a table listing only the pairing is no table; the default cut-offs are today's
    assert retrieval_metrics(scores, caption_audio, pairing) == retrieval_metrics(scores, caption_audio)
    assert set(retrieval_metrics(scores, caption_audio)["t2a"]) == {
        "mAP@10",
        "R@1",
        "R@5",
        "R@10",
        "NDCG@5",
        "NDCG@10",
        "mean_rank",
        "median_rank",
    }


def test_a_pair_given_twice_counts_once_at_its_higher_grade():
    scores, caption_audio, _, _ = random_split(7, n_audio=6)
    once = torch.sparse_coo_tensor([[1], [0]], [2.0], scores.shape, check_invariants=True)
    twice = torch.sparse_coo_tensor([[1, 1], [0, 0]], [1.0, 2.0], scores.shape, check_invariants=True)
    summed = torch.sparse_coo_tensor([[1], [0]], [3.0], scores.shape, check_invariants=True)
    assert retrieval_metrics(scores, caption_audio, twice, threshold=3.0) == retrieval_metrics(
        scores, caption_audio, once, threshold=3.0
    )
    assert retrieval_metrics(scores, caption_audio, summed, threshold=3.0) != retrieval_metrics(
        scores, caption_audio, once, threshold=3.0
    )
    zeros = torch.sparse_coo_tensor([[1], [0]], [0.0], scores.shape, check_invariants=True)  # nothing more
    assert retrieval_metrics(scores, caption_audio, zeros) == retrieval_metrics(scores, caption_audio)


def test_hand_computed_example_with_ties():
    # one caption (column 0, written for clip A = 0); the table adds clip C = 2 at grade 2 and clip B = 1 at 0.5
    scores = np.array([[0.5], [0.9], [0.2], [0.5]])  # clips A, B, C, D
    table = torch.sparse_coo_tensor([[2, 1], [0, 0]], [2.0, 0.5], (4, 1), check_invariants=True)
    m = retrieval_metrics(scores, np.array([0]), table, threshold=1.0, ks=KS)["t2a"]
    # stable ranking: B (0.9), A (0.5, index 0 before D's 0.5), D, C; relevant (grade >= 1): A 2nd, C 4th
    assert m["mAP@16"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["mAP@10"] == m["mAP@16"]
    assert (m["R@1"], m["R@5"], m["mean_rank"]) == (0.0, 1.0, 2.0)
    assert relevant_per_caption(np.array([0]), 4, table, threshold=1.0) == 2.0  # A and C; B's 0.5 is below it
    assert relevant_per_caption(np.array([0]), 4, table) == 3.0
    # graded gains: B 0.5, A 2 (its own clip: the table's highest grade), D 0, C 2; ideal order A, C, B
    dcg = 0.5 / math.log2(2) + 2 / math.log2(3) + 2 / math.log2(5)
    assert m["NDCG@5"] == pytest.approx(dcg / (2 + 2 / math.log2(3) + 0.5 / math.log2(4)))
    # D scored like A but after it: were the tie broken the other way, A would be 3rd
    swapped = retrieval_metrics(
        scores[[3, 1, 2, 0]], np.array([3]), torch.sparse_coo_tensor([[2], [0]], [2.0], (4, 1), check_invariants=True)
    )
    assert swapped["t2a"]["mean_rank"] == 3.0


def test_read_relevance_formats(tmp_path):
    long = tmp_path / "long.csv"
    pd.DataFrame({"caption": ["a dog", "a dog"], "fname": ["x.wav", "y.wav"], "relevance": [1, 0.5]}).to_csv(long)
    assert read_relevance(long).to_dict("list") == {
        "caption": ["a dog", "a dog"],
        "fname": ["x.wav", "y.wav"],
        "relevance": [1.0, 0.5],
    }
    dcase = tmp_path / "metadata_eval.csv"  # the DCASE 2025 baseline's layout
    pd.DataFrame({"query": ["a dog", "rain"], "audio_filenames": ["['x.wav', 'y.wav']", "['z.wav']"]}).to_csv(dcase)
    table = read_relevance(dcase)
    assert list(zip(table["caption"], table["fname"], table["relevance"])) == [
        ("a dog", "x.wav", 1.0),
        ("a dog", "y.wav", 1.0),
        ("rain", "z.wav", 1.0),
    ]
    by_id = tmp_path / "ids.csv"
    pd.DataFrame({"cid": [7], "fname": ["x.wav"]}).to_csv(by_id, index=False)
    pd.DataFrame({"cid": [7], "fid": [0], "fname": ["x.wav"], "raw_text": ["A dog."], "text": ["a dog"]}).to_csv(
        tmp_path / "evaluation_text.csv", index=False
    )
    assert read_relevance(by_id, tmp_path, "evaluation")["caption"].tolist() == ["A dog."]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"text": ["a"], "fname": ["x.wav"]}, "needs the columns caption"),
        ({"caption": ["a"], "fname": ["x.wav"], "relevance": [-1]}, "relevance must be a number"),
        ({"query": ["a"], "audio_filenames": ["x.wav"]}, "Python lists"),
    ],
)
def test_bad_tables_are_one_line_errors(tmp_path, frame, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(frame).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=message):
        read_relevance(path)


def test_relevance_matrix_joins_texts_and_names():
    table = pd.DataFrame(
        {"caption": ["rain", "rain", "wind", "elsewhere"], "fname": ["b.wav", "b.wav", "a.wav", "q.wav"]}
    ).assign(relevance=[0.5, 1.0, 1.0, 1.0])
    # "rain" was written for two clips: the table applies to both of its rows; the pair listed twice keeps 1.0
    matrix = relevance_matrix(table, ["a.wav", "b.wav"], ["rain", "wind", "rain"], "t.csv").to_dense()
    assert matrix.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    with pytest.raises(DatasetError, match="no row names both"):
        relevance_matrix(table, ["c.wav"], ["rain"], "t.csv")
