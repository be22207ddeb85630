"""Concept frequencies per sample, from class labels or from clustered captions.

MM-TS sets each sample's temperature from the size of its concept cluster: how many
training samples share its concept. The concepts come from one of three sources:

- class labels of the samples (`counts_from_labels`);
- a ``class_id,count`` table of training-split class frequencies, looked up by label
  (`counts_from_class_csv`, format below);
- K-Means clusters of caption embeddings (`cluster_captions`), where the embeddings are
  TF-IDF plus truncated SVD by default, or a sentence-transformers model.

The ``class_id,count`` CSV format has the header line ``class_id,count`` and one row per
class: the class id (an integer such as ``12`` or a string such as ``6_0``, without
commas) and its number of training samples, a non-negative integer.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLASS_COUNTS_HEADER",
    "ConceptClusters",
    "cluster_captions",
    "embed_captions",
    "counts_from_class_csv",
    "counts_from_labels",
    "read_captions",
    "read_class_counts",
    "run_concepts",
    "write_class_counts",
]

logger = logging.getLogger(__name__)

CLASS_COUNTS_HEADER = ("class_id", "count")

TEXT_EXTRA_HINT = "pip install 'mmts-search[text]'"

# Number of SVD components of the TF-IDF embedding (capped by the vocabulary size). 64
# keeps K-Means on 40k captions at about 2 s of single-core CPU time.
TFIDF_COMPONENTS = 64

# `IMAGE#N<TAB>caption` lines as in Flickr8k.token.txt. Some lines of that file separate
# the caption with a space instead of a tab, so any whitespace is accepted after `#N`.
_TOKEN_LINE = re.compile(r"^(?P<image>\S+#\d+)\s+(?P<caption>\S.*)$")
_TOKEN_LINE_WITH_TAB = re.compile(r"^\S+#\d+\t")

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class ConceptClusters:
    """Cluster assignment of M samples to K concept clusters.

    Attributes:
        labels: ``(M,)`` int64 cluster id of each sample, in ``[0, K)``.
        sizes: ``(K,)`` int64 number of samples in each cluster (zero for a cluster that
            K-Means left empty).
        per_sample_count: ``(M,)`` int64 size of each sample's cluster,
            ``sizes[labels]``.
    """

    labels: np.ndarray
    sizes: np.ndarray
    per_sample_count: np.ndarray

    @property
    def n_clusters(self) -> int:
        """Number of clusters K."""
        return int(self.sizes.shape[0])


def counts_from_labels(labels: Any) -> np.ndarray:
    """Return, for each sample, how many samples share its label.

    Args:
        labels: ``(M,)`` class labels of any hashable numpy dtype (ints or strings).

    Returns:
        ``(M,)`` int64 array of label frequencies within ``labels``.

    Raises:
        ValueError: if ``labels`` is not one-dimensional.
    """
    array = _label_array(labels)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)

    _, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)].astype(np.int64)


def read_class_counts(path: str | Path) -> dict[int | str, int]:
    """Read a ``class_id,count`` CSV into a dict from class id to count.

    Class ids made of digits (with an optional minus sign) become ints, all others stay
    strings. Blank lines are skipped.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on a wrong header, a malformed row, a count that is not a
            non-negative integer or a duplicate class id. The message names the file
            and the line.
    """
    path = Path(path)
    counts: dict[int | str, int] = {}
    first_line: dict[int | str, int] = {}

    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header_seen = False
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue

            cells = [cell.strip() for cell in row]
            if not header_seen:
                if tuple(cells) != CLASS_COUNTS_HEADER:
                    raise ValueError(
                        f"{path}:{line}: expected the header 'class_id,count', "
                        f"got {','.join(row)!r}"
                    )
                header_seen = True
                continue

            if len(cells) != 2 or not cells[0]:
                raise ValueError(
                    f"{path}:{line}: expected 'class_id,count' with 2 fields, got {','.join(row)!r}"
                )
            class_id = _parse_class_id(cells[0])
            count = _parse_count(cells[1], path, line)
            if class_id in counts:
                raise ValueError(
                    f"{path}:{line}: duplicate class_id {cells[0]!r} "
                    f"(first on line {first_line[class_id]})"
                )
            counts[class_id] = count
            first_line[class_id] = line

    if not header_seen:
        raise ValueError(f"{path}: the file is empty; expected the header 'class_id,count'")
    return counts


def write_class_counts(path: str | Path, counts: Mapping[int | str, int]) -> None:
    """Write a ``class_id,count`` CSV, most frequent class first (ties by class id).

    The parent folder is created when missing.

    Raises:
        ValueError: on a count that is not a non-negative integer or a class id that
            contains a comma, a quote or a line break.
    """
    rows: list[tuple[int | str, int]] = []
    for class_id, count in counts.items():
        text = str(class_id)
        if not text or any(character in text for character in ',"\r\n'):
            raise ValueError(
                f"class_id {class_id!r} cannot be written: it must be non-empty and contain "
                "no comma, quote or line break"
            )
        if isinstance(count, bool) or not float(count).is_integer() or count < 0:
            raise ValueError(f"count of class {class_id!r} must be an integer >= 0, got {count!r}")
        rows.append((class_id, int(count)))

    rows.sort(key=lambda row: (-row[1], str(row[0])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CLASS_COUNTS_HEADER)
        writer.writerows(rows)


def counts_from_class_csv(labels: Any, csv_path: str | Path) -> np.ndarray:
    """Look up each sample's class frequency in a ``class_id,count`` CSV.

    Labels match class ids by value: the label ``3``, ``np.int64(3)`` and ``"3"`` all
    match the class id ``3``.

    Args:
        labels: ``(M,)`` class label of each sample (ints or strings).
        csv_path: path of the ``class_id,count`` CSV.

    Returns:
        ``(M,)`` int64 array of class counts.

    Raises:
        ValueError: if a label is missing from the CSV (the message names the file and
            the missing classes), or the CSV is malformed.
    """
    table = read_class_counts(csv_path)
    array = _label_array(labels)
    unique, inverse = np.unique(array, return_inverse=True)

    unique_counts = np.empty(unique.shape[0], dtype=np.int64)
    missing: list[int | str] = []
    for position, label in enumerate(unique.tolist()):
        class_id = _class_id_of(label)
        if class_id in table:
            unique_counts[position] = table[class_id]
        else:
            missing.append(class_id)

    if missing:
        listed = ", ".join(repr(class_id) for class_id in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(
            f"{csv_path}: {len(missing)} label(s) have no row in the class counts: "
            f"{listed}{more}. Add them to the CSV or check that it belongs to this dataset."
        )
    return unique_counts[inverse.reshape(-1)]


def read_captions(path: str | Path) -> list[str]:
    """Read one caption per line, or the ``IMAGE#N<TAB>caption`` lines of Flickr8k.

    A file is read in the ``IMAGE#N<TAB>caption`` format when any of its lines starts
    that way. Then every non-blank line must have the form ``IMAGE#N caption``, with a
    tab or spaces after ``#N``, and only the caption is kept. Otherwise each non-blank
    line, stripped, is one caption. Blank lines are skipped in both formats.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file contains no caption or a line breaks the
            ``IMAGE#N<TAB>caption`` format (the message names the file and the line).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    token_format = any(_TOKEN_LINE_WITH_TAB.match(line) for line in lines)

    captions: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not token_format:
            captions.append(line.strip())
            continue

        match = _TOKEN_LINE.match(line.strip())
        if match is None:
            raise ValueError(
                f"{path}:{number}: expected 'IMAGE#N<TAB>caption' like the other lines, "
                f"got {line[:80]!r}"
            )
        captions.append(match.group("caption").strip())

    if not captions:
        raise ValueError(f"{path}: no caption found; expected one caption per line")
    return captions


def cluster_captions(
    captions: Sequence[str],
    *,
    n_clusters: int,
    seed: int = 0,
    embedder: str = "tfidf",
    progress: ProgressCallback | None = None,
) -> ConceptClusters:
    """Cluster captions into concepts with K-Means over caption embeddings.

    With ``embedder="tfidf"`` (the default, no model download) captions become TF-IDF
    vectors of words and word pairs, reduced to `TFIDF_COMPONENTS` dimensions by
    truncated SVD and L2-normalized. Any other value is a sentence-transformers model
    name or local path, which needs ``pip install 'mmts-search[text]'``. K-Means runs
    with a single k-means++ initialisation seeded by ``seed``, so the result is
    deterministic for a seed on one machine and library version.

    Args:
        captions: M captions.
        n_clusters: number of clusters K, 1 <= K <= M.
        seed: random seed of the SVD and K-Means.
        embedder: ``"tfidf"`` or a sentence-transformers model name or path.
        progress: called with a short description at the start of each stage.

    Returns:
        The cluster of each caption and the cluster sizes.

    Raises:
        ValueError: on an empty caption list or an invalid ``n_clusters``.
        ImportError: if a sentence-transformers model is requested but the package is
            not installed.
    """
    captions = list(captions)
    if not captions:
        raise ValueError("captions must not be empty")
    if isinstance(n_clusters, bool) or int(n_clusters) != n_clusters or not (
        1 <= n_clusters <= len(captions)
    ):
        raise ValueError(
            f"n_clusters must be an integer between 1 and the number of captions "
            f"({len(captions)}), got {n_clusters!r}"
        )
    n_clusters = int(n_clusters)

    _report(progress, f"embedding {len(captions)} captions ({embedder})")
    embeddings = embed_captions(captions, embedder=embedder, seed=seed)

    _report(progress, f"clustering into {n_clusters} clusters (K-Means)")
    labels = _kmeans(embeddings, n_clusters=n_clusters, seed=seed)

    sizes = np.bincount(labels, minlength=n_clusters).astype(np.int64)
    clusters = ConceptClusters(labels=labels, sizes=sizes, per_sample_count=sizes[labels])
    logger.info(
        "clustered %d captions into %d clusters: sizes %d to %d, %d empty",
        len(captions),
        n_clusters,
        int(sizes[sizes > 0].min()),
        int(sizes.max()),
        int((sizes == 0).sum()),
    )
    return clusters


def embed_captions(
    captions: Sequence[str], *, embedder: str = "tfidf", seed: int = 0
) -> np.ndarray:
    """Embed captions as L2-normalized float32 rows, ``(M, E)``.

    See `cluster_captions` for the choice of ``embedder``.
    """
    if embedder == "tfidf":
        return _embed_tfidf(list(captions), seed=seed)
    return _embed_sentence_transformers(list(captions), model_name=embedder)


def run_concepts(
    captions_path: str | Path,
    *,
    n_clusters: int,
    output: str | Path,
    seed: int = 0,
    embedder: str = "tfidf",
    assignments_output: str | Path | None = None,
    show_progress: bool = True,
) -> ConceptClusters:
    """Cluster the captions of a file and write the cluster sizes and assignments.

    This is the ``mmts-search concepts`` command. It writes two CSV files:

    - ``output``: ``class_id,count`` with the size of each cluster.
    - ``assignments_output`` (default: ``output`` with ``_assignments.csv`` in place of
      its suffix): ``caption_index,class_id`` with the cluster of each caption, where
      ``caption_index`` counts the non-blank lines of the captions file from 0.

    Args:
        captions_path: captions file, read by `read_captions`.
        n_clusters: number of clusters K.
        output: path of the ``class_id,count`` CSV.
        seed: random seed of the embedding and K-Means.
        embedder: ``"tfidf"`` or a sentence-transformers model name or path.
        assignments_output: path of the per-caption assignments CSV.
        show_progress: show a rich progress bar over the stages on stderr.

    Returns:
        The clusters, as `cluster_captions` returns them.
    """
    output = Path(output)
    if assignments_output is None:
        assignments_output = output.with_name(f"{output.stem}_assignments.csv")
    assignments_output = Path(assignments_output)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress_bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
    )
    stages = 4  # read, embed, cluster, write
    with progress_bar:
        task = progress_bar.add_task(f"reading {captions_path}", total=stages)

        def start_stage(description: str) -> None:
            # Each new stage completes the one before it.
            progress_bar.update(task, advance=1, description=description)

        captions = read_captions(captions_path)
        clusters = cluster_captions(
            captions, n_clusters=n_clusters, seed=seed, embedder=embedder, progress=start_stage
        )

        start_stage(f"writing {output}")
        sizes: dict[int | str, int] = {
            cluster: int(size) for cluster, size in enumerate(clusters.sizes)
        }
        write_class_counts(output, sizes)
        _write_assignments(assignments_output, clusters.labels)
        progress_bar.update(task, completed=stages, description="done")

    logger.info(
        "wrote %d cluster sizes to %s and %d caption assignments to %s",
        clusters.n_clusters,
        output,
        clusters.labels.shape[0],
        assignments_output,
    )
    return clusters


def _embed_tfidf(captions: list[str], *, seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    vectorizer = TfidfVectorizer(
        lowercase=True, stop_words="english", ngram_range=(1, 2), min_df=2, sublinear_tf=True
    )
    try:
        features = vectorizer.fit_transform(captions)
    except ValueError:
        # With too few captions for min_df=2, or only stop words, the vocabulary is
        # empty, so keep every word.
        vectorizer = TfidfVectorizer(lowercase=True, ngram_range=(1, 2), sublinear_tf=True)
        features = vectorizer.fit_transform(captions)

    n_components = min(TFIDF_COMPONENTS, features.shape[1] - 1, features.shape[0] - 1)
    if n_components < 1:
        dense = features.toarray()
    else:
        svd = TruncatedSVD(n_components=n_components, random_state=seed)
        dense = svd.fit_transform(features)
    return normalize(dense).astype(np.float32)


def _embed_sentence_transformers(captions: list[str], *, model_name: str) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            f"embedder {model_name!r} needs the sentence-transformers package, which is not "
            f"installed. Install it with {TEXT_EXTRA_HINT}, or use embedder='tfidf'."
        ) from error

    model = SentenceTransformer(model_name)
    embeddings = model.encode(
        captions, batch_size=256, normalize_embeddings=True, show_progress_bar=False
    )
    return np.asarray(embeddings, dtype=np.float32)


def _kmeans(embeddings: np.ndarray, *, n_clusters: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed, max_iter=100)
    return model.fit_predict(embeddings).astype(np.int64)


def _write_assignments(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("caption_index", "class_id"))
        writer.writerows(enumerate(labels.tolist()))


def _report(progress: ProgressCallback | None, description: str) -> None:
    logger.info("%s", description)
    if progress is not None:
        progress(description)


def _label_array(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {array.shape}")
    return array


def _parse_class_id(text: str) -> int | str:
    stripped = text.strip()
    if re.fullmatch(r"-?\d+", stripped):
        return int(stripped)
    return stripped


def _class_id_of(label: Any) -> int | str:
    """Return the CSV class id that a label matches (3, 3.0 and "3" all match 3)."""
    if isinstance(label, float) and label.is_integer():
        return int(label)
    return _parse_class_id(str(label))


def _parse_count(text: str, path: Path, line: int) -> int:
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"{path}:{line}: count must be an integer >= 0, got {text!r}")
    return int(text)
