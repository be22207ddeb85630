"""Tests of the retrieval metrics against brute-force rankings and hand-built cases."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from mmts_search import metrics as metrics_module
from mmts_search.metrics import (
    class_relevance_metrics,
    concept_groups,
    head_mid_tail_metrics,
    retrieval_metrics,
    retrieval_ranks,
)

RETRIEVAL_KEYS = {
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "rsum",
}


def brute_force_ranks(scores: np.ndarray, text_to_item: np.ndarray) -> tuple[list, list]:
    """Rank by the definition, one query at a time. ``scores`` is (M, N)."""
    n_texts, n_items = scores.shape
    t2i = []
    for m in range(n_texts):
        right = scores[m, text_to_item[m]]
        wrong = [j for j in range(n_items) if j != text_to_item[m]]
        t2i.append(1 + sum(scores[m, j] >= right for j in wrong))

    i2t = []
    for i in range(n_items):
        captions = [m for m in range(n_texts) if text_to_item[m] == i]
        if not captions:
            i2t.append(0)
            continue
        best = max(scores[m, i] for m in captions)
        wrong = [m for m in range(n_texts) if text_to_item[m] != i]
        i2t.append(1 + sum(scores[m, i] >= best for m in wrong))
    return t2i, i2t


def metrics_from_ranks(t2i: list, i2t: list, ks=(1, 5, 10)) -> dict[str, float]:
    result = {}
    total = 0.0
    for direction, ranks in (("t2i", np.array(t2i)), ("i2t", np.array([r for r in i2t if r]))):
        for k in ks:
            result[f"{direction}_r{k}"] = 100.0 * np.mean(ranks <= k)
            total += result[f"{direction}_r{k}"]
        result[f"{direction}_medr"] = float(np.median(ranks))
        result[f"{direction}_meanr"] = float(np.mean(ranks))
    result["rsum"] = total
    return result


def uneven_data(seed: int, n_items: int = 40, dim: int = 6):
    """Random embeddings with 0 to 4 captions per item; the first two items have none."""
    rng = np.random.default_rng(seed)
    per_item = rng.integers(0, 5, size=n_items)
    per_item[:2] = 0
    per_item[2] = 4
    text_to_item = np.repeat(np.arange(n_items), per_item)
    rng.shuffle(text_to_item)
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    texts = (items[text_to_item] + rng.normal(size=(len(text_to_item), dim))).astype(np.float32)
    return items, texts, text_to_item


def scores_as_embeddings(scores: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Return item and text embeddings whose score matrix text @ item.T is ``scores``."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return torch.eye(scores.shape[1]), scores


# --- retrieval_metrics ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_elements", [7, 100, 1 << 24])
def test_retrieval_matches_brute_force(
    seed: int, chunk_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "CHUNK_ELEMENTS", chunk_elements)
    items, texts, text_to_item = uneven_data(seed)
    expected_t2i, expected_i2t = brute_force_ranks(texts @ items.T, text_to_item)

    t2i, i2t = retrieval_ranks(items, texts, text_to_item)
    result = retrieval_metrics(items, texts, text_to_item)

    assert t2i.tolist() == expected_t2i
    assert i2t.tolist() == expected_i2t
    expected = metrics_from_ranks(expected_t2i, expected_i2t)
    assert set(result) == RETRIEVAL_KEYS
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_retrieval_torch_and_numpy_inputs_agree() -> None:
    items, texts, text_to_item = uneven_data(5)

    from_numpy = retrieval_metrics(items, texts, text_to_item)
    from_torch = retrieval_metrics(
        torch.from_numpy(items), torch.from_numpy(texts), torch.from_numpy(text_to_item)
    )

    assert from_numpy == from_torch


def test_retrieval_bfloat16_inputs() -> None:
    items, texts, text_to_item = uneven_data(6)

    result = retrieval_metrics(
        torch.from_numpy(items).bfloat16(), torch.from_numpy(texts).bfloat16(), text_to_item
    )

    assert set(result) == RETRIEVAL_KEYS
    assert all(math.isfinite(value) for value in result.values())


def test_retrieval_collapsed_model_gets_worst_rank() -> None:
    n_items, per_item = 12, 3
    text_to_item = np.repeat(np.arange(n_items), per_item)
    items = np.ones((n_items, 4), dtype=np.float32) / 2
    texts = np.ones((n_items * per_item, 4), dtype=np.float32) / 2

    t2i, i2t = retrieval_ranks(items, texts, text_to_item)
    result = retrieval_metrics(items, texts, text_to_item)

    assert t2i.tolist() == [n_items] * (n_items * per_item)
    assert i2t.tolist() == [n_items * per_item - per_item + 1] * n_items
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum"):
        assert result[key] == 0.0, key
    assert result["t2i_medr"] == n_items
    assert result["i2t_meanr"] == n_items * per_item - per_item + 1


def test_retrieval_nan_embeddings_get_worst_rank() -> None:
    items = np.full((5, 3), np.nan, dtype=np.float32)
    texts = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    text_to_item = np.arange(10) % 5

    t2i, i2t = retrieval_ranks(items, texts, text_to_item)

    assert t2i.tolist() == [5] * 10
    assert i2t.tolist() == [9] * 5


def test_retrieval_hand_built_ties() -> None:
    # Captions 0 and 1 belong to item 0, caption 2 to item 1, caption 3 to item 2.
    scores = np.array(
        [
            [0.5, 0.5, 0.1],  # right item tied with item 1: rank 2
            [0.9, 0.2, 0.3],  # clear win: rank 1
            [0.4, 0.4, 0.4],  # three-way tie: rank 3
            [0.3, 0.1, 0.2],  # right item (2) beaten by item 0: rank 2
        ]
    )
    items, texts = scores_as_embeddings(scores)
    text_to_item = torch.tensor([0, 0, 1, 2])

    t2i, i2t = retrieval_ranks(items, texts, text_to_item)

    assert t2i.tolist() == [2, 1, 3, 2]
    # Item 0: best caption 1 (0.9), nothing wrong above it. Item 1: caption 2 (0.4) tied
    # with caption 0 (0.5 > 0.4) and caption 1 (0.2): rank 2. Item 2: caption 3 (0.2)
    # against 0.1, 0.3 and 0.4: rank 3.
    assert i2t.tolist() == [1, 2, 3]


def test_retrieval_custom_ks() -> None:
    items, texts, text_to_item = uneven_data(3)

    result = retrieval_metrics(items, texts, text_to_item, ks=(2, 3))

    assert {"t2i_r2", "t2i_r3", "i2t_r2", "i2t_r3"} <= set(result)
    assert "t2i_r1" not in result
    recall_sum = sum(result[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (2, 3))
    assert result["rsum"] == pytest.approx(recall_sum)


@pytest.mark.parametrize("ks", [(), (0,), (1, -5), (1.5,)])
def test_retrieval_rejects_bad_ks(ks) -> None:
    items, texts, text_to_item = uneven_data(0)

    with pytest.raises(ValueError, match="ks must be a non-empty sequence of positive integers"):
        retrieval_metrics(items, texts, text_to_item, ks=ks)


def test_retrieval_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match=r"same D, got \(4, 3\) and \(5, 2\)"):
        retrieval_metrics(np.ones((4, 3)), np.ones((5, 2)), np.zeros(5, dtype=int))


def test_retrieval_rejects_index_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"text_to_item must have shape \(5,\).*got \(4,\)"):
        retrieval_metrics(np.ones((4, 3)), np.ones((5, 3)), np.zeros(4, dtype=int))


def test_retrieval_rejects_index_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"text_to_item must index items in \[0, 4\), got 4"):
        retrieval_metrics(np.ones((4, 3)), np.ones((2, 3)), np.array([0, 4]))


def test_retrieval_rejects_float_index() -> None:
    with pytest.raises(ValueError, match="text_to_item must contain integer item indices"):
        retrieval_metrics(np.ones((4, 3)), np.ones((2, 3)), np.array([0.0, 1.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_retrieval_on_cuda_matches_cpu() -> None:
    items, texts, text_to_item = uneven_data(4)

    on_cpu = retrieval_metrics(items, texts, text_to_item)
    on_cuda = retrieval_metrics(
        torch.from_numpy(items).cuda(), torch.from_numpy(texts).cuda(), text_to_item
    )

    assert on_cuda == pytest.approx(on_cpu)


# --- class relevance ------------------------------------------------------------------

# Items 0..3 with labels 0, 0, 1, 2; texts with labels 0 and 1.
HAND_SCORES = np.array(
    [
        [0.1, 0.9, 0.5, 0.3],  # text 0: relevant items 0 and 1
        [0.2, 0.2, 0.2, 0.8],  # text 1: relevant item 2, tied with items 0 and 1
    ]
)
HAND_ITEM_LABELS = np.array([0, 0, 1, 2])
HAND_TEXT_LABELS = np.array([0, 1])


def ndcg_hand_values() -> dict[str, float]:
    log2 = math.log2
    # t2i, text 0: ranked relevance [1, 0, 0, 1]; text 1 (pessimistic ties): [0, 0, 0, 1].
    text0 = (1 / log2(2) + 1 / log2(5)) / (1 / log2(2) + 1 / log2(3))
    text1 = (1 / log2(5)) / 1.0
    # i2t: item 0 ranks texts [1 (0.2), 0 (0.1)] with text 0 relevant: [0, 1].
    # Item 1: [text 0, text 1] -> [1, 0]. Item 2: [text 0, text 1] -> [0, 1].
    # Item 3 (label 2) has no relevant text and is left out.
    item0 = (1 / log2(3)) / 1.0
    item1 = 1.0
    item2 = (1 / log2(3)) / 1.0
    return {
        "t2i_ndcg": 100 * (text0 + text1) / 2,
        "i2t_ndcg": 100 * (item0 + item1 + item2) / 3,
    }


def test_class_relevance_hand_case() -> None:
    items, texts = scores_as_embeddings(HAND_SCORES)

    result = class_relevance_metrics(items, texts, HAND_ITEM_LABELS, HAND_TEXT_LABELS)

    # t2i AP: text 0 hits at positions 1 and 4 -> (1/1 + 2/4) / 2 = 0.75; text 1 hits at
    # position 4 -> 0.25. i2t AP: items 0, 1, 2 -> 0.5, 1, 0.5.
    assert result["t2i_map"] == pytest.approx(50.0)
    assert result["i2t_map"] == pytest.approx(100 * 2 / 3)
    assert result["map"] == pytest.approx((50.0 + 100 * 2 / 3) / 2)
    hand = ndcg_hand_values()
    assert result["t2i_ndcg"] == pytest.approx(hand["t2i_ndcg"])
    assert result["i2t_ndcg"] == pytest.approx(hand["i2t_ndcg"])
    assert result["ndcg"] == pytest.approx((hand["t2i_ndcg"] + hand["i2t_ndcg"]) / 2)


def test_class_recall_hand_case() -> None:
    items, texts = scores_as_embeddings(HAND_SCORES)

    result = class_relevance_metrics(items, texts, HAND_ITEM_LABELS, HAND_TEXT_LABELS)

    # t2i ranks: text 0 -> 1 (item 1), text 1 -> 4 (items 3, 0, 1 tie or beat item 2).
    assert result["cls_t2i_r1"] == pytest.approx(50.0)
    assert result["cls_t2i_r5"] == pytest.approx(100.0)
    # i2t ranks: item 0 -> 2, item 1 -> 1, item 2 -> 2.
    assert result["cls_i2t_r1"] == pytest.approx(100 / 3)
    assert result["cls_i2t_r5"] == pytest.approx(100.0)
    recall_sum = sum(result[f"cls_{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10))
    assert result["cls_rsum"] == pytest.approx(recall_sum)


def test_class_relevance_string_labels_match_int_labels() -> None:
    items, texts = scores_as_embeddings(HAND_SCORES)
    names = np.array(["pan", "cup", "knife"])

    as_strings = class_relevance_metrics(
        items, texts, names[HAND_ITEM_LABELS], names[HAND_TEXT_LABELS]
    )
    as_ints = class_relevance_metrics(items, texts, HAND_ITEM_LABELS, HAND_TEXT_LABELS)

    assert as_strings == pytest.approx(as_ints)


def test_class_relevance_multi_hot_uses_jaccard() -> None:
    # One text with labels {0, 1}; items {0, 1} (Jaccard 1), {1} (1/2), {2} (0).
    items, texts = scores_as_embeddings(np.array([[0.2, 0.9, 0.5]]))
    item_labels = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    text_labels = np.array([[1, 1, 0]])

    result = class_relevance_metrics(items, texts, item_labels, text_labels)

    # Ranked: item 1 (0.9, rel 1/2), item 2 (0.5, rel 0), item 0 (0.2, rel 1).
    dcg = 0.5 / math.log2(2) + 1.0 / math.log2(4)
    ideal = 1.0 / math.log2(2) + 0.5 / math.log2(3)
    assert result["t2i_ndcg"] == pytest.approx(100 * dcg / ideal)
    assert result["t2i_map"] == pytest.approx(100 * (1 / 1 + 2 / 3) / 2)
    assert result["cls_t2i_r1"] == pytest.approx(100.0)


def test_class_relevance_random_vs_sorting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "CHUNK_ELEMENTS", 64)
    rng = np.random.default_rng(11)
    items = rng.normal(size=(30, 5)).astype(np.float32)
    texts = rng.normal(size=(25, 5)).astype(np.float32)
    item_labels = rng.integers(0, 6, size=30)
    text_labels = rng.integers(0, 7, size=25)

    result = class_relevance_metrics(items, texts, item_labels, text_labels)

    scores = texts @ items.T
    ap, ndcg = [], []
    for m in range(25):
        relevance = (item_labels == text_labels[m]).astype(float)
        if relevance.sum() == 0:
            continue
        order = np.argsort(-scores[m], kind="stable")
        ranked = relevance[order]
        positions = np.arange(1, 31)
        ap.append(np.sum(np.cumsum(ranked) / positions * ranked) / ranked.sum())
        discounts = 1 / np.log2(positions + 1)
        ndcg.append(np.sum(ranked * discounts) / np.sum(np.sort(relevance)[::-1] * discounts))
    assert result["t2i_map"] == pytest.approx(100 * np.mean(ap))
    assert result["t2i_ndcg"] == pytest.approx(100 * np.mean(ndcg))


def test_class_relevance_collapsed_model_is_pessimistic() -> None:
    items = np.ones((4, 2), dtype=np.float32)
    texts = np.ones((2, 2), dtype=np.float32)

    result = class_relevance_metrics(items, texts, np.array([0, 1, 1, 1]), np.array([0, 1]))

    # Text 0: its one relevant item comes last of 4 -> AP 1/4.
    # Text 1: three relevant items at positions 2..4 -> (1/2 + 2/3 + 3/4) / 3.
    expected = (1 / 4 + (1 / 2 + 2 / 3 + 3 / 4) / 3) / 2
    assert result["t2i_map"] == pytest.approx(100 * expected)
    assert result["cls_t2i_r1"] == 0.0


def test_class_relevance_no_relevant_pairs_reports_zero(caplog: pytest.LogCaptureFixture) -> None:
    items, texts = scores_as_embeddings(np.array([[0.1, 0.2]]))

    with caplog.at_level(logging.WARNING, logger="mmts_search.metrics"):
        result = class_relevance_metrics(items, texts, np.array([1, 2]), np.array([3]))

    assert result["map"] == 0.0
    assert result["ndcg"] == 0.0
    assert result["cls_rsum"] == 0.0
    assert "no t2i query has a relevant candidate" in caplog.text


def test_class_relevance_rejects_mixed_label_kinds() -> None:
    with pytest.raises(ValueError, match=r"both be \(n,\) labels or both \(n, L\) multi-hot"):
        class_relevance_metrics(
            np.ones((3, 2)), np.ones((2, 2)), np.array([0, 1, 2]), np.ones((2, 4))
        )


def test_class_relevance_rejects_wrong_label_count() -> None:
    with pytest.raises(ValueError, match=r"item_labels must have 3 rows.*got shapes \(2,\)"):
        class_relevance_metrics(np.ones((3, 2)), np.ones((2, 2)), np.array([0, 1]), [0, 1])


# --- head / mid / tail ----------------------------------------------------------------

# 12 reference samples: a concept of 6, one of 3, one of 2 and one of 1.
REFERENCE_FREQ = np.array([6] * 6 + [3] * 3 + [2] * 2 + [1])


def test_concept_groups_hand_case() -> None:
    groups = concept_groups(REFERENCE_FREQ, head_fraction=1 / 3, tail_fraction=1 / 3)

    # Block middles: 6 -> 3/12 (head), 3 -> 7.5/12 (mid), 2 -> 10/12, 1 -> 11.5/12 (tail).
    assert groups.tolist() == [0] * 6 + [1] * 3 + [2] * 3


def test_concept_groups_configurable_fractions() -> None:
    groups = concept_groups(REFERENCE_FREQ, head_fraction=0.7, tail_fraction=0.1)

    assert groups.tolist() == [0] * 9 + [1] * 2 + [2]


def test_concept_groups_uses_reference_boundaries() -> None:
    groups = concept_groups(
        [100, 6, 4, 3, 2, 0.5],
        head_fraction=1 / 3,
        tail_fraction=1 / 3,
        reference_freq=REFERENCE_FREQ,
    )

    assert groups.tolist() == [0, 0, 1, 1, 2, 2]


def test_concept_groups_uniform_frequencies_are_mid() -> None:
    assert concept_groups([4, 4, 4, 4]).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("head", "tail", "message"),
    [
        (-0.1, 0.3, r"head_fraction must be between 0 and 1, got -0.1"),
        (0.3, 1.5, r"tail_fraction must be between 0 and 1, got 1.5"),
        (0.6, 0.6, r"head_fraction \+ tail_fraction must be <= 1"),
    ],
)
def test_concept_groups_rejects_bad_fractions(head: float, tail: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        concept_groups([1, 2, 3], head_fraction=head, tail_fraction=tail)


def head_mid_tail_case():
    # Captions 0..3 belong to items 0, 1, 2, 2.
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # caption 0, item 0: rank 1
            [0.8, 0.5, 0.1],  # caption 1, item 1: rank 2
            [0.1, 0.2, 0.3],  # caption 2, item 2: rank 1
            [0.5, 0.4, 0.3],  # caption 3, item 2: rank 3
        ]
    )
    items, texts = scores_as_embeddings(scores)
    text_to_item = np.array([0, 1, 2, 2])
    # Caption 0 is head, caption 1 mid, captions 2 and 3 tail.
    freq = np.array([6, 3, 1, 1])
    return items, texts, text_to_item, freq


def test_head_mid_tail_hand_case() -> None:
    items, texts, text_to_item, freq = head_mid_tail_case()

    result = head_mid_tail_metrics(items, texts, text_to_item, freq, reference_freq=REFERENCE_FREQ)

    assert [result[f"head_t2i_r{k}"] for k in (1, 5, 10)] == [100.0, 100.0, 100.0]
    assert [result[f"mid_t2i_r{k}"] for k in (1, 5, 10)] == [0.0, 100.0, 100.0]
    assert [result[f"tail_t2i_r{k}"] for k in (1, 5, 10)] == [50.0, 100.0, 100.0]
    # Every item's best caption ranks first, so each group's i2t recalls are 100.
    for group in ("head", "mid", "tail"):
        assert [result[f"{group}_i2t_r{k}"] for k in (1, 5, 10)] == [100.0] * 3
    assert result["head_rsum"] == 600.0
    assert result["mid_rsum"] == 500.0
    assert result["tail_rsum"] == 550.0
    assert "t2i_r1" not in result


def test_head_mid_tail_include_overall() -> None:
    items, texts, text_to_item, freq = head_mid_tail_case()

    result = head_mid_tail_metrics(
        items, texts, text_to_item, freq, reference_freq=REFERENCE_FREQ, include_overall=True
    )

    assert {key: result[key] for key in RETRIEVAL_KEYS} == retrieval_metrics(
        items, texts, text_to_item
    )


def test_head_mid_tail_i2t_item_groups() -> None:
    # Item 1 ranks its only caption (head) second, item 0 its tail caption first.
    scores = np.array([[0.9, 0.1], [0.95, 0.5]])
    items, texts = scores_as_embeddings(scores)

    result = head_mid_tail_metrics(
        items, texts, np.array([0, 1]), np.array([1, 50]), reference_freq=[50] * 3 + [1] * 3
    )

    assert result["head_i2t_r1"] == 100.0  # item 1: caption 1 scores 0.5 vs wrong 0.1
    assert result["tail_i2t_r1"] == 0.0  # item 0: caption 0 (0.9) below wrong caption (0.95)


def test_head_mid_tail_empty_group_reports_zero(caplog: pytest.LogCaptureFixture) -> None:
    items, texts, text_to_item, _ = head_mid_tail_case()

    with caplog.at_level(logging.WARNING, logger="mmts_search.metrics"):
        result = head_mid_tail_metrics(items, texts, text_to_item, np.array([5, 5, 5, 5]))

    assert result["head_rsum"] == 0.0
    assert result["tail_rsum"] == 0.0
    assert result["mid_rsum"] > 0
    assert all(not math.isnan(value) for value in result.values())
    assert "no caption falls in the head group" in caplog.text
    assert "no caption falls in the tail group" in caplog.text


def test_head_mid_tail_rejects_frequency_shape() -> None:
    items, texts, text_to_item, _ = head_mid_tail_case()

    with pytest.raises(ValueError, match=r"text_concept_freq must have shape \(4,\)"):
        head_mid_tail_metrics(items, texts, text_to_item, np.array([1, 2]))


def test_class_relevance_multi_hot_ties_are_pessimistic() -> None:
    items = np.ones((3, 2), dtype=np.float32)
    texts = np.ones((1, 2), dtype=np.float32)
    item_labels = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])

    result = class_relevance_metrics(items, texts, item_labels, np.array([[1, 1, 0]]))

    # All scores tie, so the order is by relevance, lowest first: 0, 1/2, 1.
    dcg = 0.5 / math.log2(3) + 1.0 / math.log2(4)
    ideal = 1.0 + 0.5 / math.log2(3)
    assert result["t2i_ndcg"] == pytest.approx(100 * dcg / ideal)
    assert result["t2i_map"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
