import math

import numpy as np
import pytest

from utils.metrics import caption_ranks, flatten_metrics, retrieval_metrics


def plain_metrics(ranked_relevance, n_relevant):
    """DCASE definitions for one query, from its ranked 0/1 relevance list; NDCG with binary relevance; the
    1-based rank of the first relevant item; and the any-hit recall of CLAP-style papers."""
    out = {f"R@{k}": sum(ranked_relevance[:k]) / n_relevant for k in (1, 5, 10)}
    hits, precision_sum = 0, 0.0
    for rank, rel in enumerate(ranked_relevance[:10], start=1):
        if rel:
            hits += 1
            precision_sum += hits / rank
    out["mAP@10"] = precision_sum / n_relevant
    for k in (5, 10):
        dcg = sum(rel / math.log2(p + 1) for p, rel in enumerate(ranked_relevance[:k], start=1))
        ideal = sum(1 / math.log2(p + 1) for p in range(1, min(n_relevant, k) + 1))
        out[f"NDCG@{k}"] = dcg / ideal
    out["rank"] = ranked_relevance.index(1) + 1
    out.update({f"any@{k}": float(any(ranked_relevance[:k])) for k in (1, 5, 10)})
    return out


def plain_retrieval_metrics(scores, caption_audio):
    n_audio, n_captions = scores.shape
    t2a, a2t = [], []
    for c in range(n_captions):
        order = np.argsort(-scores[:, c], kind="stable")
        t2a.append(plain_metrics([int(a == caption_audio[c]) for a in order], 1))
    for a in range(n_audio):
        order = np.argsort(-scores[a], kind="stable")
        a2t.append(plain_metrics([int(caption_audio[c] == a) for c in order], int((caption_audio == a).sum())))

    def summary(rows):
        out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "rank" and not k.startswith("any")}
        ranks = [r["rank"] for r in rows]
        return out | {"mean_rank": float(np.mean(ranks)), "median_rank": float(np.median(ranks))}

    any_hit = {f"R@{k}": float(np.mean([r[f"any@{k}"] for r in a2t])) for k in (1, 5, 10)}
    return {"t2a": summary(t2a), "a2t": summary(a2t), "a2t_any": any_hit}, [r["rank"] for r in t2a]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_plain_per_query_version(seed):
    rng = np.random.default_rng(seed)
    n_audio = 40
    caption_audio = np.repeat(np.arange(n_audio), 5)  # 5 captions per clip, like Clotho
    rng.shuffle(caption_audio)
    # Informative but noisy scores so hits land at many different ranks.
    scores = rng.normal(size=(n_audio, caption_audio.size)) + 2.0 * (
        caption_audio[None, :] == np.arange(n_audio)[:, None]
    )
    if seed == 2:  # exact ties, broken by index as a stable sort breaks them
        scores = np.round(scores, 0)
    fast = retrieval_metrics(scores, caption_audio)
    plain, ranks = plain_retrieval_metrics(scores, caption_audio)
    assert set(fast) == {"t2a", "a2t", "a2t_any"}
    for direction in plain:
        assert set(fast[direction]) == set(plain[direction])
        for name, value in plain[direction].items():
            if seed == 2 and not name.endswith("rank"):
                continue  # topk orders exact ties as it likes: only the ranks promise the stable order
            assert fast[direction][name] == pytest.approx(value, abs=1e-6), (direction, name)
    assert caption_ranks(scores, caption_audio).tolist() == ranks


def test_perfect_and_hand_computed_scores():
    caption_audio = np.array([0, 0, 1, 1])
    perfect = np.array([[1.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.9, 1.0]])
    m = retrieval_metrics(perfect, caption_audio)
    ones = {"mAP@10": 1.0, "R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "NDCG@5": 1.0, "NDCG@10": 1.0}
    assert m["t2a"] == pytest.approx(ones | {"mean_rank": 1.0, "median_rank": 1.0})
    # A clip has two relevant captions, so a perfect ranking still finds only half of them at rank 1 (DCASE);
    # counting any caption in the top k, it finds one every time
    assert m["a2t"] == pytest.approx(ones | {"R@1": 0.5, "mean_rank": 1.0, "median_rank": 1.0})
    assert m["a2t_any"] == pytest.approx({"R@1": 1.0, "R@5": 1.0, "R@10": 1.0})
    # Clip 0 ranks its captions 1st and 3rd: AP = (1/1 + 2/3) / 2.
    scores = np.array([[0.9, 0.1, 0.5, 0.0], [0.0, 0.2, 1.0, 1.0]])
    assert retrieval_metrics(scores, caption_audio)["a2t"]["mAP@10"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)


def test_ndcg_and_ranks_by_hand():
    # clip 0's captions rank 1st and 3rd: DCG = 1/log2(2) + 1/log2(4) = 1.5, ideal = 1 + 1/log2(3) = 1.6309
    caption_audio = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1, 0.5, 0.0], [0.0, 0.2, 1.0, 1.0]])  # clip 1's captions tie at 1.0
    m = retrieval_metrics(scores, caption_audio)
    assert m["a2t"]["NDCG@5"] == pytest.approx((1.5 / (1 + 1 / math.log2(3)) + 1.0) / 2)
    # captions rank their clips: 0 -> 1st (0.9 > 0.0), 1 -> 2nd (0.1 < 0.2), 2 -> 1st (1.0 > 0.5), 3 -> 1st
    assert caption_ranks(scores, caption_audio).tolist() == [1, 2, 1, 1]
    assert m["t2a"]["mean_rank"] == 1.25 and m["t2a"]["median_rank"] == 1.0
    # a tie is broken by index, as a stable sort: clip 1 is behind clip 0 when both score 0.5 for caption 0
    tied = np.array([[0.5, 0.9, 0.0, 0.0], [0.5, 0.0, 1.0, 1.0]])
    assert caption_ranks(tied, np.array([1, 0, 1, 1])).tolist() == [2, 1, 1, 1]
    assert m["t2a"]["NDCG@10"] == pytest.approx((3 + 1 / math.log2(3)) / 4)  # one caption finds its clip 2nd


def test_shape_mismatch_and_flattened_keys():
    with pytest.raises(ValueError, match="caption_audio"):
        retrieval_metrics(np.zeros((3, 4)), np.zeros(5, dtype=int))
    flat = flatten_metrics({"t2a": {"mAP@10": 0.5}}, "val")
    assert flat == {"val/t2a_mAP@10": 0.5}
