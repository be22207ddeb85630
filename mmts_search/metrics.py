"""Retrieval metrics for image-text and video-text models.

Items are images or videos, texts are captions. Every score is a dot product of an item
embedding and a text embedding, so pass L2-normalized embeddings to rank by cosine
similarity. Recalls, mAP and nDCG are percentages (0 to 100), ranks are 1-based.

Ties count against the query: a rank is 1 plus the number of wrong candidates that score
at least as high as the right one. A collapsed model that gives every candidate the same
score therefore gets the worst rank, not the best. NaN scores are treated as ``-inf``, so
a model that outputs NaN ties everywhere and also gets the worst rank.

Score matrices are formed in chunks of about `CHUNK_ELEMENTS` entries, so that a
COCO-size evaluation (5,000 items, 25,000 captions) stays within a few hundred MB, and
ranks are counted with comparisons, not sorting. mAP and nDCG need a sort per query.

Every function accepts torch tensors or numpy arrays and computes on the device of
``item_emb`` (CPU or CUDA).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "class_relevance_metrics",
    "concept_groups",
    "head_mid_tail_metrics",
    "retrieval_metrics",
    "retrieval_ranks",
]

logger = logging.getLogger(__name__)

# Number of score-matrix entries formed at once (64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24

GROUP_NAMES = ("head", "mid", "tail")


def retrieval_metrics(
    item_emb: Any,
    text_emb: Any,
    text_to_item: Any,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Compute text-to-item and item-to-text recall at k, median and mean rank.

    The text-to-item (t2i) rank of caption ``m`` is the rank of item ``text_to_item[m]``
    among all items. The item-to-text (i2t) rank of an item is the rank of its
    best-ranked caption among all captions, where only the other items' captions count
    as wrong. Items without captions are left out of the i2t metrics, because no caption
    can be right for them. They still count as wrong candidates for t2i.

    Args:
        item_emb: ``(N, D)`` item embeddings.
        text_emb: ``(M, D)`` caption embeddings.
        text_to_item: ``(M,)`` integer index of each caption's item, in ``[0, N)``. Items
            may have any number of captions, including none.
        ks: cutoffs of the recalls, positive integers.

    Returns:
        ``t2i_r{k}`` and ``i2t_r{k}`` for each k (percent of queries whose rank is <= k),
        ``t2i_medr``, ``t2i_meanr``, ``i2t_medr``, ``i2t_meanr`` (the median is the mean of
        the two middle ranks for an even count), and ``rsum``, the sum of all recalls.

    Raises:
        ValueError: on mismatched shapes, an index out of range or an invalid k.
    """
    ks = _check_ks(ks)
    t2i_ranks, i2t_ranks = retrieval_ranks(item_emb, text_emb, text_to_item)
    return _summarize_ranks(t2i_ranks, i2t_ranks[i2t_ranks > 0], ks)


def retrieval_ranks(
    item_emb: Any, text_emb: Any, text_to_item: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the 1-based t2i rank of every caption and i2t rank of every item.

    The rules are those of `retrieval_metrics`. Each of the two directions forms the
    score matrix once, in chunks.

    Returns:
        ``(t2i_ranks, i2t_ranks)``: int64 tensors of shape ``(M,)`` and ``(N,)`` on the
        device of ``item_emb``. Items without captions get rank 0.
    """
    items, texts = _prepare_embeddings(item_emb, text_emb)
    text_to_item = _prepare_index(text_to_item, texts.shape[0], items.shape[0], items.device)
    finite = bool(torch.isfinite(items).all()) and bool(torch.isfinite(texts).all())

    t2i_ranks = _text_to_item_ranks(items, texts, text_to_item, finite=finite)
    i2t_ranks = _item_to_text_ranks(items, texts, text_to_item, finite=finite)
    return t2i_ranks, i2t_ranks


def class_relevance_metrics(
    item_emb: Any,
    text_emb: Any,
    item_labels: Any,
    text_labels: Any,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Compute mAP, nDCG and class recall where relevance comes from concept labels.

    This is the multi-instance retrieval evaluation of EPIC-KITCHENS-100: any candidate
    whose label matches the query's is relevant, not only the paired one.

    Labels are either one label per sample (``(n,)`` ints or strings), where relevance
    is 1 for the same label and 0 otherwise, or multi-hot ``(n, L)`` label sets. For
    sets, a candidate is relevant when it shares at least one label with the query, and
    its graded relevance for nDCG is the Jaccard index of the two sets.

    - mAP: mean over queries of the average precision with binary relevance.
    - nDCG: mean over queries of ``DCG / IDCG`` with ``DCG = sum_p rel_p / log2(p + 1)``
      over the whole ranking and IDCG the DCG of the ideal order.
    - Class recall at k: percent of queries with a relevant candidate in the top k, where
      a rank counts the irrelevant candidates that score at least as high as the best
      relevant one.

    Among candidates with equal scores, the less relevant ones are ranked first, so ties
    count against the query. Queries without any relevant candidate are left out.
    ``map`` and ``ndcg`` average the two directions.

    Args:
        item_emb: ``(N, D)`` item embeddings.
        text_emb: ``(M, D)`` caption embeddings.
        item_labels: ``(N,)`` labels or ``(N, L)`` multi-hot label sets.
        text_labels: ``(M,)`` labels or ``(M, L)`` multi-hot label sets, of the same kind.
        ks: cutoffs of the class recalls, positive integers.

    Returns:
        ``map``, ``ndcg``, ``t2i_map``, ``i2t_map``, ``t2i_ndcg``, ``i2t_ndcg``,
        ``cls_t2i_r{k}``, ``cls_i2t_r{k}`` for each k, and ``cls_rsum`` (the sum of the
        class recalls), all in percent. A direction without any query that has a
        relevant candidate reports 0.0 (with a logged warning).

    Raises:
        ValueError: on mismatched shapes or labels of different kinds.
    """
    ks = _check_ks(ks)
    items, texts = _prepare_embeddings(item_emb, text_emb)
    item_labels, text_labels = _prepare_labels(
        item_labels, text_labels, items.shape[0], texts.shape[0], items.device
    )

    t2i = _relevance_ranking(texts, items, text_labels, item_labels)
    i2t = _relevance_ranking(items, texts, item_labels, text_labels)

    metrics: dict[str, float] = {}
    for direction, result in (("t2i", t2i), ("i2t", i2t)):
        if result.n_queries == 0:
            logger.warning(
                "class relevance metrics: no %s query has a relevant candidate; "
                "reporting 0.0 for that direction",
                direction,
            )
        metrics[f"{direction}_map"] = result.mean_average_precision
        metrics[f"{direction}_ndcg"] = result.mean_ndcg

    metrics["map"] = 0.5 * (metrics["t2i_map"] + metrics["i2t_map"])
    metrics["ndcg"] = 0.5 * (metrics["t2i_ndcg"] + metrics["i2t_ndcg"])

    recall_sum = 0.0
    for direction, result in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            recall = _recall(result.best_relevant_ranks, k)
            metrics[f"cls_{direction}_r{k}"] = recall
            recall_sum += recall
    metrics["cls_rsum"] = recall_sum
    return metrics


def concept_groups(
    concept_freq: Any,
    *,
    head_fraction: float = 1 / 3,
    tail_fraction: float = 1 / 3,
    reference_freq: Any | None = None,
) -> np.ndarray:
    """Assign each sample to the head (0), mid (1) or tail (2) of the concept distribution.

    Order the reference samples from the most to the least frequent concept. The samples
    of one concept form a block in that order, and the middle of the block decides the
    concept's group. The concept is head when the middle lies in the first
    ``head_fraction`` of the order, tail when it lies in the last ``tail_fraction``, and
    mid otherwise. A frequency missing from the reference falls where it would be
    inserted. When every concept has the same frequency, every sample is mid.

    Args:
        concept_freq: ``(n,)`` training-split frequency of each sample's concept (for
            example its cluster size).
        head_fraction: share of the reference samples held by head concepts, in [0, 1].
        tail_fraction: share held by tail concepts, in [0, 1], with
            ``head_fraction + tail_fraction <= 1``.
        reference_freq: per-sample concept frequencies that set the boundaries, usually
            those of the training split. Defaults to ``concept_freq``.

    Returns:
        ``(n,)`` int64 array of group ids: 0 head, 1 mid, 2 tail.

    Raises:
        ValueError: on invalid fractions or frequencies that are not a finite 1-D array.
    """
    for name, fraction in (("head_fraction", head_fraction), ("tail_fraction", tail_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {fraction}")
    if head_fraction + tail_fraction > 1.0 + 1e-12:
        raise ValueError(
            "head_fraction + tail_fraction must be <= 1, got "
            f"{head_fraction} + {tail_fraction} = {head_fraction + tail_fraction}"
        )

    freq = _frequency_array("concept_freq", concept_freq)
    if reference_freq is None:
        reference = freq
    else:
        reference = _frequency_array("reference_freq", reference_freq)
    groups = np.ones(freq.shape[0], dtype=np.int64)
    if reference.size == 0:
        return groups

    reference = np.sort(reference)
    n_more_frequent = reference.size - np.searchsorted(reference, freq, side="right")
    n_same = np.searchsorted(reference, freq, side="right") - np.searchsorted(
        reference, freq, side="left"
    )
    block_middle = (n_more_frequent + 0.5 * n_same) / reference.size

    groups[block_middle < head_fraction] = 0
    groups[block_middle > 1.0 - tail_fraction] = 2
    return groups


def head_mid_tail_metrics(
    item_emb: Any,
    text_emb: Any,
    text_to_item: Any,
    text_concept_freq: Any,
    *,
    head_fraction: float = 1 / 3,
    tail_fraction: float = 1 / 3,
    reference_freq: Any | None = None,
    ks: Sequence[int] = (1, 5, 10),
    include_overall: bool = False,
) -> dict[str, float]:
    """Compute the recalls of `retrieval_metrics` separately for head, mid and tail concepts.

    Captions are grouped by `concept_groups` on their concept frequency. For group g:

    - t2i recall uses only the captions of group g as queries.
    - i2t recall uses only the items with at least one caption in group g as queries,
      with the item's overall i2t rank (its best-ranked caption of any group).

    The gallery is always complete: all items for t2i, all captions for i2t. An empty
    group reports 0.0 for all of its recalls, with a logged warning, because NaN would
    break the comparison of trials.

    Args:
        item_emb: ``(N, D)`` item embeddings.
        text_emb: ``(M, D)`` caption embeddings.
        text_to_item: ``(M,)`` integer index of each caption's item.
        text_concept_freq: ``(M,)`` training-split frequency of each caption's concept.
        head_fraction: see `concept_groups`.
        tail_fraction: see `concept_groups`.
        reference_freq: see `concept_groups`. Pass the training captions' frequencies
            so that the boundaries follow the training split.
        ks: cutoffs of the recalls.
        include_overall: also return the keys of `retrieval_metrics`, computed from the
            same ranks, which saves a second pass over the score matrix.

    Returns:
        ``{g}_t2i_r{k}``, ``{g}_i2t_r{k}`` and ``{g}_rsum`` for g in head, mid, tail, in
        percent (plus the `retrieval_metrics` keys when ``include_overall``).
    """
    ks = _check_ks(ks)
    t2i_ranks, i2t_ranks = retrieval_ranks(item_emb, text_emb, text_to_item)
    n_texts = t2i_ranks.shape[0]

    freq = _frequency_array("text_concept_freq", text_concept_freq)
    if freq.shape[0] != n_texts:
        raise ValueError(
            f"text_concept_freq must have shape ({n_texts},) to match text_emb, got {freq.shape}"
        )
    group_ids = concept_groups(
        freq,
        head_fraction=head_fraction,
        tail_fraction=tail_fraction,
        reference_freq=reference_freq,
    )
    groups = torch.from_numpy(group_ids).to(t2i_ranks.device)
    text_to_item = _prepare_index(
        text_to_item, n_texts, i2t_ranks.shape[0], t2i_ranks.device
    )

    metrics: dict[str, float] = {}
    if include_overall:
        metrics.update(_summarize_ranks(t2i_ranks, i2t_ranks[i2t_ranks > 0], ks))

    for group_id, group in enumerate(GROUP_NAMES):
        in_group = groups == group_id
        items_in_group = torch.zeros_like(i2t_ranks, dtype=torch.bool)
        items_in_group[text_to_item[in_group]] = True

        if not bool(in_group.any()):
            logger.warning(
                "no caption falls in the %s group (head_fraction=%s, tail_fraction=%s); "
                "reporting 0.0 for its recalls",
                group,
                head_fraction,
                tail_fraction,
            )

        recall_sum = 0.0
        for direction, ranks in (("t2i", t2i_ranks[in_group]), ("i2t", i2t_ranks[items_in_group])):
            for k in ks:
                recall = _recall(ranks, k)
                metrics[f"{group}_{direction}_r{k}"] = recall
                recall_sum += recall
        metrics[f"{group}_rsum"] = recall_sum
    return metrics


def _text_to_item_ranks(
    items: torch.Tensor, texts: torch.Tensor, text_to_item: torch.Tensor, *, finite: bool
) -> torch.Tensor:
    n_items, n_texts = items.shape[0], texts.shape[0]
    ranks = torch.empty(n_texts, dtype=torch.int64, device=items.device)
    chunk = max(1, CHUNK_ELEMENTS // n_items)

    for start in range(0, n_texts, chunk):
        stop = min(start + chunk, n_texts)
        scores = _scores(texts[start:stop], items, finite=finite)
        right = scores.gather(1, text_to_item[start:stop].unsqueeze(1))

        # The right item counts itself once, so the count of scores >= right is the rank.
        ranks[start:stop] = (scores >= right).sum(1, dtype=torch.int32)
    return ranks


def _item_to_text_ranks(
    items: torch.Tensor, texts: torch.Tensor, text_to_item: torch.Tensor, *, finite: bool
) -> torch.Tensor:
    n_items, n_texts = items.shape[0], texts.shape[0]
    ranks = torch.zeros(n_items, dtype=torch.int64, device=items.device)
    chunk = max(1, CHUNK_ELEMENTS // n_texts)

    # Captions sorted by item, so that the captions of items [start, stop) are one slice.
    caption_order = torch.argsort(text_to_item, stable=True)
    caption_counts = torch.bincount(text_to_item, minlength=n_items)
    offsets = torch.zeros(n_items + 1, dtype=torch.int64, device=items.device)
    offsets[1:] = torch.cumsum(caption_counts, 0)
    offsets_list = offsets.tolist()

    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        captions = caption_order[offsets_list[start] : offsets_list[stop]]
        if captions.numel() == 0:
            continue

        scores = _scores(items[start:stop], texts, finite=finite)
        rows = text_to_item[captions] - start
        right = scores[rows, captions]
        best = torch.full((stop - start,), -math.inf, device=items.device)
        best.scatter_reduce_(0, rows, right, reduce="amax", include_self=True)

        # Count every caption that scores at least the best right score, then subtract
        # the right captions among them. The rest are the wrong captions that tie or beat it.
        at_least_best = scores >= best.unsqueeze(1)
        counts = at_least_best.sum(1, dtype=torch.int32).to(torch.int64)
        counts.index_add_(0, rows, at_least_best[rows, captions].to(torch.int64), alpha=-1)
        ranks[start:stop] = counts + 1

    ranks[caption_counts == 0] = 0
    return ranks


def _scores(queries: torch.Tensor, candidates: torch.Tensor, *, finite: bool) -> torch.Tensor:
    scores = queries @ candidates.T
    if not finite:
        scores = torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return scores


class _RelevanceResult:
    """Per-direction sums of the class-relevance metrics over the queries that count."""

    def __init__(self, device: torch.device) -> None:
        self.n_queries = 0
        self.average_precision_sum = 0.0
        self.ndcg_sum = 0.0
        self.rank_parts: list[torch.Tensor] = []
        self.device = device

    @property
    def mean_average_precision(self) -> float:
        return 100.0 * self.average_precision_sum / self.n_queries if self.n_queries else 0.0

    @property
    def mean_ndcg(self) -> float:
        return 100.0 * self.ndcg_sum / self.n_queries if self.n_queries else 0.0

    @property
    def best_relevant_ranks(self) -> torch.Tensor:
        if not self.rank_parts:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        return torch.cat(self.rank_parts)


def _relevance_ranking(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
) -> _RelevanceResult:
    n_candidates = candidates.shape[0]
    result = _RelevanceResult(queries.device)
    finite = bool(torch.isfinite(queries).all()) and bool(torch.isfinite(candidates).all())
    chunk = max(1, CHUNK_ELEMENTS // (8 * n_candidates))  # about ten (c, n) buffers at once

    binary = query_labels.dim() == 1
    positions = torch.arange(1, n_candidates + 1, device=queries.device, dtype=torch.float32)
    discounts = 1.0 / torch.log2(positions + 1.0)
    cumulative_discounts = torch.cumsum(discounts.to(torch.float64), 0)

    for start in range(0, queries.shape[0], chunk):
        stop = min(start + chunk, queries.shape[0])
        scores = _scores(queries[start:stop], candidates, finite=finite)
        relevance = _relevance(query_labels[start:stop], candidate_labels)
        relevant = relevance > 0
        n_relevant = relevant.sum(1)
        has_relevant = n_relevant > 0
        if not bool(has_relevant.any()):
            continue

        scores, relevance, relevant, n_relevant = (
            scores[has_relevant],
            relevance[has_relevant],
            relevant[has_relevant],
            n_relevant[has_relevant],
        )

        # Rank of the best relevant candidate, ties counting against the query.
        best = scores.masked_fill(~relevant, -math.inf).amax(1, keepdim=True)
        wrong_ahead = ((scores >= best) & ~relevant).sum(1)
        result.rank_parts.append(wrong_ahead + 1)

        order = _pessimistic_order(scores, relevance)
        ranked = relevance.gather(1, order)

        hits = (ranked > 0).to(torch.float32)
        precision = torch.cumsum(hits, 1).div_(positions)
        average_precision = (precision * hits).sum(1, dtype=torch.float64) / n_relevant
        result.average_precision_sum += float(average_precision.sum())

        dcg = (ranked @ discounts).to(torch.float64)
        if binary:
            # Relevance is 0 or 1, so the ideal ranking puts the n relevant first.
            ideal_dcg = cumulative_discounts[n_relevant - 1]
        else:
            ideal = torch.sort(relevance, dim=1, descending=True).values
            ideal_dcg = (ideal @ discounts).to(torch.float64)
        result.ndcg_sum += float((dcg / ideal_dcg).sum())
        result.n_queries += int(scores.shape[0])
    return result


def _pessimistic_order(scores: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Return the ``(q, n)`` candidate order: highest score first, less relevant first on ties.

    One sort of an int64 key does both: the high 33 bits order the float32 scores, the
    low 31 bits order the non-negative float32 relevances in reverse.
    """
    # Flipping the magnitude bits of negative floats makes int32 order follow float
    # order. Adding 0.0 turns -0.0 into +0.0, so that the two zeros tie.
    score_bits = (scores + 0.0).view(torch.int32)
    score_key = torch.where(score_bits < 0, score_bits ^ 0x7FFFFFFF, score_bits)
    relevance_bits = relevance.contiguous().view(torch.int32)
    key = score_key.to(torch.int64) * (1 << 31) + (0x7FFFFFFF - relevance_bits)
    return torch.sort(key, dim=1, descending=True).indices


def _relevance(query_labels: torch.Tensor, candidate_labels: torch.Tensor) -> torch.Tensor:
    """Return the ``(q, n)`` float32 graded relevance of candidates to queries."""
    if query_labels.dim() == 1:
        return (query_labels.unsqueeze(1) == candidate_labels.unsqueeze(0)).to(torch.float32)

    overlap = query_labels @ candidate_labels.T
    union = query_labels.sum(1, keepdim=True) + candidate_labels.sum(1) - overlap
    return torch.where(overlap > 0, overlap / union.clamp_min(1.0), torch.zeros_like(overlap))


def _summarize_ranks(
    t2i_ranks: torch.Tensor, i2t_ranks: torch.Tensor, ks: tuple[int, ...]
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    recall_sum = 0.0
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        for k in ks:
            recall = _recall(ranks, k)
            metrics[f"{direction}_r{k}"] = recall
            recall_sum += recall

        values = ranks.cpu().numpy().astype(np.float64)
        metrics[f"{direction}_medr"] = float(np.median(values)) if values.size else 0.0
        metrics[f"{direction}_meanr"] = float(values.mean()) if values.size else 0.0
    metrics["rsum"] = recall_sum
    return metrics


def _recall(ranks: torch.Tensor, k: int) -> float:
    if ranks.numel() == 0:
        return 0.0
    return 100.0 * float((ranks <= k).sum()) / ranks.numel()


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks)
    if not values or any(isinstance(k, bool) or int(k) != k or k < 1 for k in values):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in values)


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor or a numeric array: {error}") from None


def _prepare_embeddings(item_emb: Any, text_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    items = _as_tensor("item_emb", item_emb)
    texts = _as_tensor("text_emb", text_emb)
    if items.dim() != 2 or texts.dim() != 2 or items.shape[1] != texts.shape[1]:
        raise ValueError(
            "item_emb must have shape (N, D) and text_emb shape (M, D) with the same D, got "
            f"{tuple(items.shape)} and {tuple(texts.shape)}"
        )
    if items.shape[0] == 0 or texts.shape[0] == 0:
        raise ValueError(
            "item_emb and text_emb must each contain at least one row, got "
            f"{tuple(items.shape)} and {tuple(texts.shape)}"
        )
    # Scores of bfloat16 or float16 embeddings are compared in float32.
    items = items.to(torch.float32)
    texts = texts.to(device=items.device, dtype=torch.float32)
    return items, texts


def _prepare_index(
    text_to_item: Any, n_texts: int, n_items: int, device: torch.device
) -> torch.Tensor:
    index = _as_tensor("text_to_item", text_to_item)
    if index.shape != (n_texts,):
        raise ValueError(
            f"text_to_item must have shape ({n_texts},) to match text_emb, got {tuple(index.shape)}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"text_to_item must contain integer item indices, got dtype {index.dtype}")

    index = index.to(device=device, dtype=torch.int64)
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= n_items:
        bad = low if low < 0 else high
        raise ValueError(
            f"text_to_item must index items in [0, {n_items}), got {bad}"
        )
    return index


def _prepare_labels(
    item_labels: Any,
    text_labels: Any,
    n_items: int,
    n_texts: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    items = _label_array(item_labels)
    texts = _label_array(text_labels)
    if items.shape[0] != n_items or texts.shape[0] != n_texts:
        raise ValueError(
            f"item_labels must have {n_items} rows and text_labels {n_texts} rows to match "
            f"the embeddings, got shapes {items.shape} and {texts.shape}"
        )
    if items.ndim != texts.ndim or items.ndim not in (1, 2):
        raise ValueError(
            "item_labels and text_labels must both be (n,) labels or both (n, L) multi-hot "
            f"label sets, got shapes {items.shape} and {texts.shape}"
        )

    if items.ndim == 2:
        if items.shape[1] != texts.shape[1]:
            raise ValueError(
                "multi-hot item_labels and text_labels must have the same number of labels, "
                f"got shapes {items.shape} and {texts.shape}"
            )
        return (
            torch.as_tensor(items != 0, dtype=torch.float32, device=device),
            torch.as_tensor(texts != 0, dtype=torch.float32, device=device),
        )

    # Map labels of any type (ints, strings) to shared integer codes.
    _, inverse = np.unique(np.concatenate([items, texts]), return_inverse=True)
    codes = torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)
    return codes[:n_items], codes[n_items:]


def _label_array(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def _frequency_array(name: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of frequencies, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must contain only finite frequencies, got NaN or infinity")
    return array
