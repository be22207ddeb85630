"""Tests of concept frequencies from labels, class-count CSVs and caption clustering."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest

from mmts_search.concepts import (
    ConceptClusters,
    cluster_captions,
    counts_from_class_csv,
    counts_from_labels,
    read_captions,
    read_class_counts,
    run_concepts,
    write_class_counts,
)

TOY_CAPTIONS = [
    "a dog runs on the grass",
    "a brown dog runs through the grass",
    "the dog is running in a field",
    "a black dog jumps over a log",
    "a man rides a bike on the road",
    "a man is riding his bicycle down the road",
    "a cyclist rides along a mountain road",
    "children play in the water at the beach",
    "two kids splash in the ocean water",
    "a girl swims in the blue water",
]


# --- labels and class-count CSVs ------------------------------------------------------


def test_counts_from_labels_int_and_string() -> None:
    assert counts_from_labels([3, 1, 3, 2, 3]).tolist() == [3, 1, 3, 1, 3]
    assert counts_from_labels(np.array(["6_0", "1_2", "6_0"])).tolist() == [2, 1, 2]
    assert counts_from_labels([]).tolist() == []


def test_counts_from_labels_rejects_2d() -> None:
    with pytest.raises(ValueError, match=r"labels must be a 1-D array, got shape \(2, 2\)"):
        counts_from_labels(np.zeros((2, 2)))


def test_read_class_counts_ek100_nouns(shared_data: Path) -> None:
    counts = read_class_counts(shared_data / "ek100" / "ek100_noun_freq.csv")

    assert len(counts) == 289
    assert counts[0] == 3617
    assert max(counts.values()) == 3617
    assert min(counts.values()) == 2
    assert all(isinstance(class_id, int) for class_id in counts)


def test_read_class_counts_string_ids(shared_data: Path) -> None:
    counts = read_class_counts(shared_data / "ek100" / "ek100_verb_noun_freq.csv")

    assert len(counts) == 3568
    assert counts["6_0"] == 1784


def test_counts_from_class_csv_ek100(shared_data: Path) -> None:
    path = shared_data / "ek100" / "ek100_noun_freq.csv"

    counts = counts_from_class_csv(np.array([0, 0, 2, 1, 3]), path)

    assert counts.dtype == np.int64
    assert counts.tolist() == [3617, 3617, 2457, 2351, 2312]


def test_class_counts_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "counts.csv"

    write_class_counts(path, {2: 5, 0: 40, "6_0": 7, 1: 5})

    assert path.read_text().splitlines() == [
        "class_id,count",
        "0,40",
        "6_0,7",
        "1,5",
        "2,5",
    ]
    assert read_class_counts(path) == {0: 40, "6_0": 7, 1: 5, 2: 5}


def test_class_csv_lookup_by_value(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    write_class_counts(path, {3: 10, "a_b": 4})

    assert counts_from_class_csv(np.array([3, 3]), path).tolist() == [10, 10]
    assert counts_from_class_csv(["3", "a_b"], path).tolist() == [10, 4]
    assert counts_from_class_csv(np.array([3.0]), path).tolist() == [10]


def test_counts_from_class_csv_names_missing_classes(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    write_class_counts(path, {0: 10, 1: 4})

    with pytest.raises(ValueError, match=r"counts.csv: 2 label\(s\) have no row.*: 5, 7\."):
        counts_from_class_csv([0, 5, 1, 7, 5], path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,count\n0,3\n", r"bad.csv:1: expected the header 'class_id,count', got 'id,count'"),
        ("class_id,count\n0,3\n1,2,9\n", r"bad.csv:3: expected 'class_id,count' with 2 fields"),
        ("class_id,count\n0,3\n1\n", r"bad.csv:3: expected 'class_id,count' with 2 fields"),
        ("class_id,count\n0,three\n", r"bad.csv:2: count must be an integer >= 0, got 'three'"),
        ("class_id,count\n0,-4\n", r"bad.csv:2: count must be an integer >= 0, got '-4'"),
        ("class_id,count\n0,2.5\n", r"bad.csv:2: count must be an integer >= 0, got '2.5'"),
        ("class_id,count\n,2\n", r"bad.csv:2: expected 'class_id,count' with 2 fields"),
        ("class_id,count\n4,1\n\n4,2\n", r"bad.csv:4: duplicate class_id '4' \(first on line 2\)"),
        ("", r"bad.csv: the file is empty; expected the header 'class_id,count'"),
    ],
)
def test_read_class_counts_rejects_malformed_csv(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)

    with pytest.raises(ValueError, match=message):
        read_class_counts(path)


def test_read_class_counts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_class_counts(tmp_path / "absent.csv")


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"a,b": 1}, r"class_id 'a,b' cannot be written"),
        ({0: -1}, r"count of class 0 must be an integer >= 0, got -1"),
        ({0: 1.5}, r"count of class 0 must be an integer >= 0, got 1.5"),
    ],
)
def test_write_class_counts_rejects_bad_rows(tmp_path: Path, counts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_class_counts(tmp_path / "out.csv", counts)


# --- captions -------------------------------------------------------------------------


def test_read_captions_plain_lines(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_text("a dog runs\n\n  a cat sleeps  \n")

    assert read_captions(path) == ["a dog runs", "a cat sleeps"]


def test_read_captions_token_format(tmp_path: Path) -> None:
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text(
        "1000.jpg#0 A child climbs the stairs .\n"
        "1000.jpg#1\tA girl goes into a building .\n"
        "\n"
        "2000.jpg#0\tTwo dogs play .\n"
    )

    assert read_captions(path) == [
        "A child climbs the stairs .",
        "A girl goes into a building .",
        "Two dogs play .",
    ]


def test_read_captions_rejects_malformed_token_line(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_text("1000.jpg#0\tA child .\nno image id here\n")

    with pytest.raises(ValueError, match=r"captions.txt:2: expected 'IMAGE#N<TAB>caption'"):
        read_captions(path)


def test_read_captions_rejects_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")

    with pytest.raises(ValueError, match=r"empty.txt: no caption found"):
        read_captions(path)


def test_read_captions_flickr8k(shared_data: Path) -> None:
    captions = read_captions(shared_data / "flickr8k" / "Flickr8k.token.txt")

    assert len(captions) == 40460
    assert captions[0] == (
        "A child in a pink dress is climbing up a set of stairs in an entry way ."
    )
    assert captions[1] == "A girl going into a wooden building ."


# --- clustering -----------------------------------------------------------------------


def test_cluster_captions_toy_groups() -> None:
    clusters = cluster_captions(TOY_CAPTIONS, n_clusters=3, seed=0)

    assert isinstance(clusters, ConceptClusters)
    assert clusters.labels.dtype == np.int64
    assert clusters.labels.shape == (10,)
    assert clusters.n_clusters == 3
    assert int(clusters.sizes.sum()) == 10
    assert clusters.per_sample_count.tolist() == clusters.sizes[clusters.labels].tolist()
    # The four dog captions share a cluster, the three road captions share another.
    assert len(set(clusters.labels[:4].tolist())) == 1
    assert len(set(clusters.labels[4:7].tolist())) == 1
    assert clusters.labels[0] != clusters.labels[4]


def test_cluster_captions_reports_progress() -> None:
    stages: list[str] = []

    cluster_captions(TOY_CAPTIONS, n_clusters=2, progress=stages.append)

    assert stages == [
        "embedding 10 captions (tfidf)",
        "clustering into 2 clusters (K-Means)",
    ]


@pytest.mark.parametrize("n_clusters", [0, 11, 2.5, True])
def test_cluster_captions_rejects_bad_cluster_count(n_clusters) -> None:
    with pytest.raises(ValueError, match=r"n_clusters must be an integer between 1 and .* \(10\)"):
        cluster_captions(TOY_CAPTIONS, n_clusters=n_clusters)


def test_cluster_captions_rejects_empty_list() -> None:
    with pytest.raises(ValueError, match="captions must not be empty"):
        cluster_captions([], n_clusters=1)


def test_sentence_transformers_missing_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def import_without_sentence_transformers(name, *args, **kwargs):
        if name == "sentence_transformers" or name.startswith("sentence_transformers."):
            raise ImportError("No module named 'sentence_transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sentence_transformers", raising=False)
    monkeypatch.setattr(builtins, "__import__", import_without_sentence_transformers)

    with pytest.raises(ImportError, match=r"pip install 'mmts-search\[text\]'"):
        cluster_captions(TOY_CAPTIONS, n_clusters=2, embedder="all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def flickr8k_clusters(shared_data: Path) -> tuple[list[str], ConceptClusters]:
    captions = read_captions(shared_data / "flickr8k" / "Flickr8k.token.txt")
    return captions, cluster_captions(captions, n_clusters=50, seed=0)


def test_flickr8k_clusters_cover_every_caption(flickr8k_clusters) -> None:
    captions, clusters = flickr8k_clusters

    assert clusters.labels.shape == (len(captions),)
    assert clusters.labels.min() >= 0
    assert clusters.labels.max() < 50
    assert clusters.sizes.shape == (50,)
    assert int(clusters.sizes.sum()) == len(captions)
    assert np.array_equal(np.bincount(clusters.labels, minlength=50), clusters.sizes)
    assert np.array_equal(clusters.per_sample_count, clusters.sizes[clusters.labels])


def test_flickr8k_clusters_have_long_tail(flickr8k_clusters) -> None:
    _, clusters = flickr8k_clusters

    assert clusters.sizes.min() > 0
    assert clusters.sizes.max() >= 5 * clusters.sizes.min()


def test_flickr8k_clustering_deterministic_for_seed(flickr8k_clusters) -> None:
    captions, clusters = flickr8k_clusters

    again = cluster_captions(captions, n_clusters=50, seed=0)

    assert np.array_equal(again.labels, clusters.labels)
    assert np.array_equal(again.sizes, clusters.sizes)


# --- run_concepts ---------------------------------------------------------------------


@pytest.mark.parametrize("show_progress", [False, True])
def test_run_concepts_writes_counts_and_assignments(tmp_path: Path, show_progress: bool) -> None:
    captions_path = tmp_path / "captions.txt"
    captions_path.write_text("\n".join(TOY_CAPTIONS) + "\n")
    output = tmp_path / "out" / "concepts.csv"

    clusters = run_concepts(
        captions_path, n_clusters=3, output=output, seed=1, show_progress=show_progress
    )

    counts = read_class_counts(output)
    assert counts == {cluster: int(size) for cluster, size in enumerate(clusters.sizes)}
    assignments = (tmp_path / "out" / "concepts_assignments.csv").read_text().splitlines()
    assert assignments[0] == "caption_index,class_id"
    assert assignments[1:] == [f"{index},{label}" for index, label in enumerate(clusters.labels)]
    assert counts_from_class_csv(clusters.labels, output).tolist() == (
        clusters.per_sample_count.tolist()
    )


def test_run_concepts_custom_assignments_path(tmp_path: Path) -> None:
    captions_path = tmp_path / "captions.txt"
    captions_path.write_text("\n".join(TOY_CAPTIONS))
    assignments = tmp_path / "labels.csv"

    run_concepts(
        captions_path,
        n_clusters=2,
        output=tmp_path / "counts.csv",
        assignments_output=assignments,
        show_progress=False,
    )

    assert len(assignments.read_text().splitlines()) == 11


def test_run_concepts_missing_captions_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_concepts(
            tmp_path / "absent.txt", n_clusters=2, output=tmp_path / "o.csv", show_progress=False
        )
