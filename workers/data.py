"""Datasets for one trial: long-tail digits, synthetic clusters and precomputed features.

`load_dataset` turns one `DatasetSpec` of the sweep file into a `TrialData`. It contains a
train and a test split of paired items (images, video clips) and captions, with the
training frequency of each caption's concept. Where they exist, it also contains concept
labels for class-relevance metrics.

Sources
-------
``builtin:digits-lt``
    The 1,797 handwritten 8x8 digits that ship inside scikit-learn, made long-tail. First
    ``test_per_class`` images of every class are drawn at random for a balanced test split.
    From the rest, class ``c`` keeps ``n_c = floor(n_max * ratio ** (-c / (C - 1)))``
    images (at least 1), where ``n_max`` is the smallest number of images any class has
    left and ``ratio`` is ``imbalance_ratio``. The class order is fixed: digit 0 is the
    largest class and digit 9 the smallest, so that every seed has the same head and tail
    digits. Each image gets a caption drawn from several phrasings of its class, with
    numerals and number words ("a handwritten 3", "the digit three", ...). The concept of
    a sample is its class. Captions repeat within a class, so class-relevance metrics
    (mAP, nDCG) are reported next to the instance recalls.
``builtin:synthetic-lt``
    Synthetic data for tests and scale benchmarks: ``n_concepts`` clusters with Zipf sizes
    (``size_k`` proportional to ``(k + 1) ** -zipf_exponent``) in a latent space, and two
    modalities made by two different random linear maps of the latent points plus
    Gaussian noise. It is generated in chunks into one preallocated float32 tensor per
    modality, so that N = 1,000,000 and D = 512 need about 2 GiB per modality.
``features``
    Precomputed, paired embeddings (the format for real data at scale), read from a local
    path or from S3. The layout is below.

Feature layout
--------------
``path`` is a local folder, an S3 prefix (``s3://bucket/prefix``), or one archive file
(``.npz`` or ``.safetensors``, local or on S3). With N items and M captions the arrays are:

==================  ===================  ===============================================
key                 shape and dtype      meaning
==================  ===================  ===============================================
``items``           (N, D1) float        item embeddings
``texts``           (M, D2) float        caption embeddings
``text_to_item``    (M,) int             row of ``items`` that caption ``j`` describes
``split``           (N,) int             0 = train, 1 = test; a caption follows its item
``item_labels``     (N,) int or str      optional concept label per item
``text_labels``     (M,) int or str      optional concept label per caption
``labels``          (N,) or (M,)         optional; per item when its length is N (also
                                         when N == M), else per caption
==================  ===================  ===============================================

In a folder, the first of these layouts that is present is used:

1. ``features.npz``: the arrays under the keys above (``numpy.savez``; read with
   ``allow_pickle=False``, so string labels must be fixed-width ``<U`` arrays).
2. ``features.safetensors``: the same keys (numeric labels only).
3. ``items.parquet`` with the columns ``embedding`` (list of floats), ``split`` and an
   optional ``label``, plus ``texts.parquet`` with ``embedding``, ``text_to_item`` and an
   optional ``label``.
4. One ``.npy`` file per key: ``items.npy``, ``texts.npy``, ``text_to_item.npy``,
   ``split.npy`` and the optional ``labels.npy``, ``item_labels.npy``, ``text_labels.npy``.

Concepts of a features dataset (``concepts`` in the dataset spec; ``concepts.path`` is a
local path or an ``s3://`` URL and may lie anywhere, for example beside the features):

- not set: the labels of the layout when it has any, else every caption is its own
  concept (count 1, logged as a warning; the MM-TS shift is then the same for all).
- ``labels``: labels from ``concepts.path`` (a ``.npy`` file, or ``.npz`` with the key
  ``labels``), per item or per caption, or from the layout when the path is unset.
- ``class_csv``: ``concepts.path`` is a ``class_id,count`` CSV of training frequencies;
  each caption's count is the count of its label, and a label missing from the CSV is an
  error. Needs labels in the layout.
- ``captions``: ``concepts.path`` holds one caption per line in the row order of
  ``texts`` (or Flickr-style ``IMAGE#N<TAB>caption`` lines). K-Means with
  ``concepts.clusters`` clusters groups them, and cluster sizes over the training split
  are the counts. Cluster ids only set the counts: mAP and nDCG use the layout labels,
  and are skipped when the layout has none.

S3 and the download cache
-------------------------
``s3://`` paths are read with boto3. Credentials and region come from the standard AWS
environment variables or profile. The endpoint is ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` (boto3 reads both); when neither is set, ``MLFLOW_S3_ENDPOINT_URL`` is
used, because a cluster that keeps MLflow artifacts on MinIO usually keeps data there too.
Each object is downloaded once into ``$MMTS_CACHE_DIR`` (default ``~/.cache/mmts-search``),
under a folder named by the SHA-256 of endpoint, bucket, key, ETag and size, so a changed
object gets a new cache entry and workers on one machine share the download. A download
goes to a temporary name first and is renamed when complete.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from mmts_search.spec import DatasetSpec

logger = logging.getLogger(__name__)

DATA_SOURCES = ("builtin:digits-lt", "builtin:synthetic-lt", "features")

ARRAY_KEYS = ("items", "texts", "text_to_item", "split")
LABEL_KEYS = ("item_labels", "text_labels", "labels")

# Rows per chunk when scanning or generating large arrays: 8,192 rows of 512 float32
# values are 16 MiB, small next to the arrays themselves.
CHUNK_ROWS = 8_192


class DataError(ValueError):
    """Raised for a dataset that cannot be used; the message names the file and problem."""


# --------------------------------------------------------------------------------------
# Trial data
# --------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """One split of a dataset, with every tensor on the training device.

    Attributes:
        item_inputs: (N, ...) float32 items: images (N, 1, 8, 8) for raw data, embeddings
            (N, D1) for features.
        text_inputs: (M, L) int64 token ids, 0 = padding, for raw data; (M, D2) float32
            caption embeddings for features.
        text_to_item: (M,) int64 row of ``item_inputs`` that each caption describes.
        counts: (M,) float32 number of training captions whose concept is the caption's
            concept (0 for a concept absent from the training split).
        item_labels: (N,) int64 concept label per item, or None when the dataset has no
            labels (class-relevance metrics are skipped then).
        text_labels: (M,) int64 concept label per caption, or None.
    """

    item_inputs: torch.Tensor
    text_inputs: torch.Tensor
    text_to_item: torch.Tensor
    counts: torch.Tensor
    item_labels: torch.Tensor | None = None
    text_labels: torch.Tensor | None = None

    @property
    def num_items(self) -> int:
        return int(self.item_inputs.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.text_inputs.shape[0])


@dataclass
class TrialData:
    """A dataset ready for training: train and test splits plus the input dimensions.

    Attributes:
        name: dataset name from the sweep file (metric prefix with several datasets).
        kind: ``"raw"`` (images and token ids, for the small encoders) or ``"features"``.
        train: the training split; ``train.counts`` drive the temperature schedule.
        test: the held-out split used for evaluation after every epoch.
        item_dim: size of one flattened item (64 for 8x8 images, D1 for features).
        text_dim: caption length in tokens (raw) or caption embedding size D2 (features).
        vocab_size: number of token ids including padding 0 (raw), 0 for features.
        item_shape: shape of one item, for example (1, 8, 8) or (D1,).
        vocab: token of each id (raw only; id 0 is the padding token ``""``).
        files: file name or URL -> local path, for every file read (empty for builtins).
    """

    name: str
    kind: Literal["raw", "features"]
    train: SplitData
    test: SplitData
    item_dim: int
    text_dim: int
    vocab_size: int
    item_shape: tuple[int, ...]
    vocab: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def train_text_to_item(self) -> torch.Tensor:
        """(M_train,) int64 item row of each training caption."""
        return self.train.text_to_item

    @property
    def train_counts(self) -> torch.Tensor:
        """(M_train,) float32 training frequency of each training caption's concept."""
        return self.train.counts

    @property
    def has_labels(self) -> bool:
        """Whether the test split has concept labels for mAP, nDCG and class recalls."""
        return self.test.item_labels is not None and self.test.text_labels is not None


def load_dataset(ds: DatasetSpec, *, seed: int, device: torch.device | str = "cpu") -> TrialData:
    """Build the train and test splits of one dataset on ``device``.

    Args:
        ds: the dataset entry of the sweep file.
        seed: seed used when ``ds.seed`` is not set (the trial's ``training.seed``); it
            fixes the split, the sampled digits and captions and the synthetic data.
        device: where the tensors are placed.

    Raises:
        DataError: for a missing or broken file, bucket or value; the message names it.
    """
    dataset_seed = int(ds.seed) if getattr(ds, "seed", None) is not None else int(seed)
    device = torch.device(device)

    if ds.source == "builtin:digits-lt":
        data = make_digits_lt(
            name=ds.name,
            imbalance_ratio=float(ds.imbalance_ratio),
            test_per_class=int(ds.test_per_class),
            seed=dataset_seed,
            device=device,
        )
    elif ds.source == "builtin:synthetic-lt":
        data = make_synthetic_lt(
            name=ds.name,
            n_items=int(ds.n_items),
            dim=int(ds.dim),
            n_concepts=int(ds.n_concepts),
            zipf_exponent=float(ds.zipf_exponent),
            captions_per_item=int(ds.captions_per_item),
            noise=float(ds.noise),
            test_fraction=float(ds.test_fraction),
            seed=dataset_seed,
            device=device,
        )
    elif ds.source == "features":
        data = load_features(ds, seed=dataset_seed, device=device)
    else:
        raise DataError(
            f"dataset {ds.name!r}: unknown source {ds.source!r}; "
            f"expected one of {', '.join(DATA_SOURCES)}"
        )

    logger.info(
        "dataset %s (%s): %d train items, %d train captions, %d test items, "
        "%d test captions, concept counts %d..%d, on %s",
        ds.name, ds.source, data.train.num_items, data.train.num_texts, data.test.num_items,
        data.test.num_texts, int(data.train.counts.min()), int(data.train.counts.max()),
        device,
    )
    return data


def fingerprint_dataset(ds: DatasetSpec) -> dict[str, str]:
    """Return the SHA-256 hex digest of every file a dataset reads, keyed by path or URL.

    Built-in datasets read no file and return an empty dict. S3 files are hashed from the
    local cache (they are downloaded first when not cached yet).
    """
    if ds.source != "features":
        return {}
    files = _FeatureFiles.resolve(ds)
    return {display: _sha256_file(path) for display, path in files.used_files().items()}


# --------------------------------------------------------------------------------------
# builtin:digits-lt
# --------------------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption phrasings: {n} is the numeral, {w} the number word.
DIGIT_PHRASINGS = (
    "a handwritten {n}",
    "the digit {w}",
    "number {n} written by hand",
    "a hand-drawn {w}",
    "the numeral {n}",
    "an image of the number {w}",
    "a scanned digit {n}",
    "{w} written by hand",
)


def digit_captions(digit: int) -> list[str]:
    """Return every caption phrasing of one digit class (0-9)."""
    return [p.format(n=digit, w=DIGIT_WORDS[digit]) for p in DIGIT_PHRASINGS]


def long_tail_sizes(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Return the exponential class sizes ``floor(n_max * ratio ** (-c / (C - 1)))``.

    Class 0 keeps ``n_max`` samples and class ``C - 1`` about ``n_max / ratio``; every
    class keeps at least one. Returns an int64 array of shape (C,).
    """
    if imbalance_ratio < 1:
        raise DataError(f"imbalance_ratio must be at least 1 but got {imbalance_ratio}")
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    exponents = -np.arange(num_classes, dtype=np.float64) / (num_classes - 1)
    sizes = np.floor(n_max * np.power(imbalance_ratio, exponents) + 1e-9).astype(np.int64)
    return np.maximum(sizes, 1)


def make_digits_lt(
    *,
    name: str = "digits-lt",
    imbalance_ratio: float = 10.0,
    test_per_class: int = 30,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> TrialData:
    """Build the long-tail handwritten digits dataset (see the module docstring).

    Args:
        imbalance_ratio: size of the largest training class over the smallest (>= 1).
        test_per_class: test images per class, drawn before the long-tail subsampling.
        seed: fixes the test draw, the kept training images and the caption phrasings.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / 16.0  # pixel values 0..16
    targets = np.asarray(digits.target, dtype=np.int64)
    num_classes = int(targets.max()) + 1
    rng = np.random.default_rng(seed)

    smallest_class = int(np.bincount(targets, minlength=num_classes).min())
    if test_per_class < 1 or test_per_class >= smallest_class:
        raise DataError(
            f"dataset {name!r}: test_per_class must be between 1 and {smallest_class - 1} "
            f"(the smallest digit class has {smallest_class} images) but got {test_per_class}"
        )

    test_rows: list[np.ndarray] = []
    pools: list[np.ndarray] = []
    for digit in range(num_classes):
        rows = rng.permutation(np.flatnonzero(targets == digit))
        test_rows.append(rows[:test_per_class])
        pools.append(rows[test_per_class:])

    n_max = min(len(pool) for pool in pools)
    sizes = long_tail_sizes(n_max, num_classes, imbalance_ratio)
    train_rows = [pool[: sizes[digit]] for digit, pool in enumerate(pools)]

    vocab = _digit_vocabulary()
    token_ids = {token: index for index, token in enumerate(vocab)}
    phrasings = [digit_captions(digit) for digit in range(num_classes)]
    max_tokens = max(len(text.split()) for texts in phrasings for text in texts)

    def build_split(rows_per_class: list[np.ndarray], train_freq: np.ndarray) -> SplitData:
        rows = np.concatenate(rows_per_class)
        rows = rows[rng.permutation(len(rows))]
        labels = targets[rows]
        choices = rng.integers(0, len(DIGIT_PHRASINGS), size=len(rows))
        tokens = np.zeros((len(rows), max_tokens), dtype=np.int64)
        for row, (label, choice) in enumerate(zip(labels, choices, strict=True)):
            words = phrasings[label][choice].split()
            tokens[row, : len(words)] = [token_ids[word] for word in words]
        labels_tensor = torch.from_numpy(labels).to(device)
        return SplitData(
            item_inputs=torch.from_numpy(images[rows]).unsqueeze(1).to(device),
            text_inputs=torch.from_numpy(tokens).to(device),
            text_to_item=torch.arange(len(rows), device=device),
            counts=torch.from_numpy(train_freq[labels].astype(np.float32)).to(device),
            item_labels=labels_tensor,
            text_labels=labels_tensor.clone(),
        )

    train = build_split(train_rows, sizes)
    test = build_split(test_rows, sizes)
    height, width = images.shape[1:]
    return TrialData(
        name=name,
        kind="raw",
        train=train,
        test=test,
        item_dim=int(height * width),
        text_dim=max_tokens,
        vocab_size=len(vocab),
        item_shape=(1, int(height), int(width)),
        vocab=vocab,
    )


def _digit_vocabulary() -> list[str]:
    words = {word for digit in range(10) for text in digit_captions(digit) for word in text.split()}
    return ["", *sorted(words)]


# --------------------------------------------------------------------------------------
# builtin:synthetic-lt
# --------------------------------------------------------------------------------------


def zipf_sizes(n_items: int, n_concepts: int, exponent: float) -> np.ndarray:
    """Return (K,) int64 cluster sizes proportional to ``(k + 1) ** -exponent``, summing to N.

    Every cluster gets at least one item. Rounding leftovers go to the clusters with the
    largest fractional parts, so the sizes add up to ``n_items`` exactly.
    """
    if n_concepts < 1 or n_items < n_concepts:
        raise DataError(
            f"synthetic-lt needs 1 <= n_concepts <= n_items but got n_concepts={n_concepts}, "
            f"n_items={n_items}"
        )
    weights = np.power(np.arange(1, n_concepts + 1, dtype=np.float64), -exponent)
    ideal = (n_items - n_concepts) * weights / weights.sum()
    sizes = np.floor(ideal).astype(np.int64)
    leftover = (n_items - n_concepts) - int(sizes.sum())
    if leftover > 0:
        sizes[np.argsort(-(ideal - sizes), kind="stable")[:leftover]] += 1
    return sizes + 1


def make_synthetic_lt(
    *,
    name: str = "synthetic-lt",
    n_items: int = 5000,
    dim: int = 64,
    n_concepts: int = 50,
    zipf_exponent: float = 1.1,
    captions_per_item: int = 1,
    noise: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    latent_dim: int | None = None,
    center_scale: float = 2.0,
) -> TrialData:
    """Generate synthetic long-tail paired data (clearly not real data).

    Each item ``i`` of concept ``k`` has a latent point ``z_i = center_scale * c_k + e_i``
    (``c_k`` and ``e_i`` standard normal, dimension ``latent_dim``). The item is
    ``z_i @ A + noise * n`` and each of its captions ``z_i @ B + noise * n'`` with two
    fixed random maps ``A``, ``B`` of shape (latent_dim, dim) and fresh standard noise.
    Concepts have Zipf sizes. The first ``round(test_fraction * n_items)`` items (in
    random concept order) form the test split. Both splits are views of one tensor per
    modality, which is generated in chunks without float64 or full-size temporaries.

    Args:
        n_items: number of items N (>= n_concepts and >= 3).
        dim: embedding size D of both modalities.
        captions_per_item: captions per item (M = N * captions_per_item).
        noise: standard deviation of the per-sample noise after the linear maps.
        test_fraction: fraction of items in the test split, in (0, 1).
        latent_dim: latent size (default ``min(dim, 64)``).
        center_scale: spread of the concept centers relative to the spread within one.
    """
    if captions_per_item < 1:
        raise DataError(f"dataset {name!r}: captions_per_item must be >= 1 but got "
                        f"{captions_per_item}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"dataset {name!r}: test_fraction must be between 0 and 1 "
                        f"(exclusive) but got {test_fraction}")
    if dim < 1 or noise < 0:
        raise DataError(f"dataset {name!r}: dim must be >= 1 and noise >= 0 but got "
                        f"dim={dim}, noise={noise}")
    n_test = int(round(test_fraction * n_items))
    if n_test < 1 or n_items - n_test < 2:
        raise DataError(
            f"dataset {name!r}: n_items={n_items} with test_fraction={test_fraction} leaves "
            f"{n_test} test and {n_items - n_test} train items; need at least 1 and 2"
        )

    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    latent = min(dim, 64) if latent_dim is None else int(latent_dim)

    sizes = torch.from_numpy(zipf_sizes(n_items, n_concepts, zipf_exponent))
    ordered = torch.repeat_interleave(torch.arange(n_concepts), sizes)
    item_labels = ordered[torch.randperm(n_items, generator=generator)]
    centers = center_scale * torch.randn(n_concepts, latent, generator=generator)
    item_map = torch.randn(latent, dim, generator=generator) / math.sqrt(latent)
    text_map = torch.randn(latent, dim, generator=generator) / math.sqrt(latent)

    per_item = captions_per_item
    items = torch.empty((n_items, dim), dtype=torch.float32, device=device)
    texts = torch.empty((n_items * per_item, dim), dtype=torch.float32, device=device)
    chunk = max(1, CHUNK_ROWS // per_item)
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        points = centers[item_labels[start:stop]]
        points += torch.randn(points.shape, generator=generator)
        _fill_noisy_map(items[start:stop], points, item_map, noise, generator)
        _fill_noisy_map(texts[start * per_item : stop * per_item],
                        points.repeat_interleave(per_item, dim=0), text_map, noise, generator)

    text_labels = item_labels.repeat_interleave(per_item)
    n_test_texts = n_test * per_item
    train_freq = torch.bincount(text_labels[n_test_texts:], minlength=n_concepts).float()

    def build_split(item_rows: slice, text_rows: slice) -> SplitData:
        labels = text_labels[text_rows]
        num_texts = labels.shape[0]
        return SplitData(
            item_inputs=items[item_rows],
            text_inputs=texts[text_rows],
            text_to_item=(torch.arange(num_texts) // per_item).to(device),
            counts=train_freq[labels].to(device),
            item_labels=item_labels[item_rows].to(device),
            text_labels=labels.to(device),
        )

    return TrialData(
        name=name,
        kind="features",
        train=build_split(slice(n_test, None), slice(n_test_texts, None)),
        test=build_split(slice(0, n_test), slice(0, n_test_texts)),
        item_dim=dim,
        text_dim=dim,
        vocab_size=0,
        item_shape=(dim,),
    )


def _fill_noisy_map(target: torch.Tensor, points: torch.Tensor, linear_map: torch.Tensor,
                    noise: float, generator: torch.Generator) -> None:
    """Write ``points @ linear_map + noise * N(0, 1)`` into ``target`` (rows of a big tensor).

    On the CPU the result is computed in place, so the only temporary is the noise block.
    """
    staging = target if target.device.type == "cpu" else torch.empty(target.shape)
    torch.matmul(points, linear_map, out=staging)
    staging.add_(torch.randn(staging.shape, generator=generator), alpha=noise)
    if staging is not target:
        target.copy_(staging)


# --------------------------------------------------------------------------------------
# features: file locations, S3 and the download cache
# --------------------------------------------------------------------------------------


def is_s3_url(path: str) -> bool:
    return path.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (bucket, key); the key may be empty."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"invalid S3 URL {url!r}: expected s3://bucket/key")
    return bucket, key


def cache_dir() -> Path:
    """Folder of the S3 download cache: ``$MMTS_CACHE_DIR`` or ``~/.cache/mmts-search``."""
    configured = os.environ.get("MMTS_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mmts-search"


def make_s3_client() -> Any:
    """Create a boto3 S3 client; the endpoint rule is in the module docstring."""
    import boto3

    endpoint = None
    if not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def _s3_error(url: str, error: Exception) -> DataError:
    """Translate a boto3 error for ``url`` into a DataError with the cause and the fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return DataError(
            f"no AWS credentials found to read {url}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(error, EndpointConnectionError):
        return DataError(f"cannot reach the S3 endpoint for {url}: {error}")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        bucket, key = split_s3_url(url)
        if code == "NoSuchBucket":
            return DataError(f"S3 bucket not found: {bucket!r} (reading {url})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return DataError(f"feature file not found: {url}")
        if code in ("AccessDenied", "403", "Forbidden"):
            return DataError(f"access denied to {url}: check the AWS credentials and policy")
        return DataError(f"S3 request for {url} failed with {code or 'an error'}: {error}")
    return DataError(f"reading {url} failed: {error}")


@dataclass(frozen=True)
class _S3Object:
    bucket: str
    key: str
    etag: str
    size: int

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def download_cached(client: Any, obj: _S3Object) -> Path:
    """Return a local copy of an S3 object, downloading it only when not cached yet."""
    endpoint = str(getattr(client.meta, "endpoint_url", ""))
    identity = "\n".join((endpoint, obj.bucket, obj.key, obj.etag, str(obj.size)))
    folder = cache_dir() / "s3" / hashlib.sha256(identity.encode()).hexdigest()[:40]
    target = folder / PurePosixPath(obj.key).name
    if target.is_file() and target.stat().st_size == obj.size:
        logger.debug("S3 cache hit for %s at %s", obj.url, target)
        return target

    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
    logger.info("downloading %s (%d bytes) to the cache %s", obj.url, obj.size, folder)
    try:
        client.download_file(obj.bucket, obj.key, str(partial))
        if partial.stat().st_size != obj.size:
            raise DataError(
                f"download of {obj.url} is incomplete: {partial.stat().st_size} of "
                f"{obj.size} bytes"
            )
        os.replace(partial, target)
    except DataError:
        raise
    except Exception as error:  # boto3 raises several unrelated exception types
        raise _s3_error(obj.url, error) from error
    finally:
        partial.unlink(missing_ok=True)
    return target


class _Folder:
    """A folder of feature files: a local directory or an S3 prefix, listed once."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        self._client: Any = None
        self._objects: dict[str, _S3Object] | None = None

    @property
    def is_s3(self) -> bool:
        return is_s3_url(self.location)

    def display(self, name: str) -> str:
        if self.is_s3:
            return f"{self.location}/{name}"
        return str(Path(self.location) / name)

    def names(self) -> set[str]:
        if not self.is_s3:
            folder = Path(self.location)
            if not folder.is_dir():
                raise DataError(f"feature folder not found: {folder}")
            return {entry.name for entry in folder.iterdir() if entry.is_file()}
        return set(self._list_s3())

    def fetch(self, name: str) -> Path:
        """Return the local path of ``name``, downloading it from S3 when needed."""
        if not self.is_s3:
            path = Path(self.location) / name
            if not path.is_file():
                raise DataError(f"feature file not found: {path}")
            return path
        objects = self._list_s3()
        if name not in objects:
            raise DataError(f"feature file not found: {self.display(name)}")
        return download_cached(self._s3_client(), objects[name])

    def _s3_client(self) -> Any:
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def _list_s3(self) -> dict[str, _S3Object]:
        if self._objects is not None:
            return self._objects
        bucket, prefix = split_s3_url(self.location)
        prefix = f"{prefix}/" if prefix else ""
        objects: dict[str, _S3Object] = {}
        try:
            pages = self._s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(prefix):]
                    objects[name] = _S3Object(
                        bucket, entry["Key"], str(entry.get("ETag", "")).strip('"'),
                        int(entry["Size"]),
                    )
        except Exception as error:  # boto3 raises several unrelated exception types
            raise _s3_error(self.location + "/", error) from error
        self._objects = objects
        return objects


def _split_file_path(path: str) -> tuple[_Folder, str]:
    """Split the path of one file (local or S3) into its folder and file name."""
    if is_s3_url(path):
        bucket, key = split_s3_url(path)
        parent, _, name = key.rpartition("/")
        return _Folder(f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}"), name
    local = Path(path).expanduser()
    return _Folder(str(local.parent)), local.name


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def _sha256_file(path: Path) -> str:
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA256_MEMO[memo_key] = digest.hexdigest()
    return _SHA256_MEMO[memo_key]


# --------------------------------------------------------------------------------------
# features: layouts and array reading
# --------------------------------------------------------------------------------------

_LAYOUTS = ("npz", "safetensors", "parquet", "npy")


@dataclass
class _FeatureFiles:
    """The files one features dataset reads: the main layout plus optional concept files."""

    dataset: str
    folder: _Folder
    layout: str
    main: list[str]
    concept_file: tuple[_Folder, str] | None = None
    fetched: dict[str, Path] = field(default_factory=dict)
    fetched_concept: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def resolve(cls, ds: DatasetSpec) -> _FeatureFiles:
        """Find the layout under ``ds.path`` and the concept file named by ``ds.concepts``."""
        if not ds.path:
            raise DataError(f"dataset {ds.name!r}: source 'features' needs a path")
        path = str(ds.path)

        if path.endswith((".npz", ".safetensors")):
            folder, name = _split_file_path(path)
            layout = "npz" if name.endswith(".npz") else "safetensors"
            files = cls(ds.name, folder, layout, [name])
        else:
            folder = _Folder(path if is_s3_url(path) else str(Path(path).expanduser()))
            files = cls._detect(ds.name, folder)

        files.concept_file = files._concept_file(ds)
        return files

    @classmethod
    def _detect(cls, dataset: str, folder: _Folder) -> _FeatureFiles:
        names = folder.names()
        if "features.npz" in names:
            return cls(dataset, folder, "npz", ["features.npz"])
        if "features.safetensors" in names:
            return cls(dataset, folder, "safetensors", ["features.safetensors"])
        if "items.parquet" in names or "texts.parquet" in names:
            main = ["items.parquet", "texts.parquet"]
            missing = [name for name in main if name not in names]
            if missing:
                raise DataError(f"feature file not found: {folder.display(missing[0])} "
                                f"(a Parquet layout needs items.parquet and texts.parquet)")
            return cls(dataset, folder, "parquet", main)

        required = [f"{key}.npy" for key in ARRAY_KEYS]
        present = [name for name in required if name in names]
        if not present:
            raise DataError(
                f"no feature files found in {folder.location}: expected features.npz, "
                f"features.safetensors, items.parquet + texts.parquet, or "
                f"{', '.join(required)}"
            )
        missing = [name for name in required if name not in names]
        if missing:
            raise DataError(f"feature file not found: {folder.display(missing[0])}")
        optional = [f"{key}.npy" for key in LABEL_KEYS if f"{key}.npy" in names]
        return cls(dataset, folder, "npy", required + optional)

    def _concept_file(self, ds: DatasetSpec) -> tuple[_Folder, str] | None:
        concepts = getattr(ds, "concepts", None)
        if concepts is None:
            return None
        if concepts.path:
            return _split_file_path(str(concepts.path))
        if concepts.kind in ("class_csv", "captions"):
            raise DataError(
                f"dataset {self.dataset!r}: concepts.kind {concepts.kind!r} needs "
                f"concepts.path (a local file or an s3:// URL)"
            )
        return None

    def fetch(self, name: str) -> Path:
        if name not in self.fetched:
            self.fetched[name] = self.folder.fetch(name)
        return self.fetched[name]

    def fetch_concept_file(self) -> tuple[str, Path]:
        assert self.concept_file is not None
        folder, name = self.concept_file
        display = folder.display(name)
        if display not in self.fetched_concept:
            self.fetched_concept[display] = folder.fetch(name)
        return display, self.fetched_concept[display]

    def used_files(self) -> dict[str, Path]:
        """Display name -> local path of every file the dataset reads (fetching them)."""
        files = {self.folder.display(name): self.fetch(name) for name in self.main}
        if self.concept_file is not None:
            display, local = self.fetch_concept_file()
            files[display] = local
        return files


def _load_npy(path: Path, display: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise DataError(f"{display} cannot be read without pickle ({error}); save plain "
                        f"numeric or fixed-width string arrays") from error
    except OSError as error:
        raise DataError(f"{display} is not a valid .npy file: {error}") from error
    if not isinstance(array, np.ndarray):
        raise DataError(f"{display} is not a single .npy array")
    return array


def _load_npz(path: Path, display: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:
        raise DataError(f"{display} cannot be read without pickle ({error}); save plain "
                        f"numeric or fixed-width string arrays") from error
    except (OSError, EOFError) as error:
        raise DataError(f"{display} is not a valid .npz archive: {error}") from error


def _load_safetensors(path: Path, display: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"{display} is not a valid safetensors file: {error}") from error


def _parquet_embeddings(table: Any, display: str) -> np.ndarray:
    """Return the ``embedding`` list column of a Parquet table as an (R, D) array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "embedding" not in table.column_names:
        raise DataError(f"{display} has no column 'embedding' (columns: "
                        f"{', '.join(table.column_names)})")
    column = table.column("embedding").combine_chunks()
    kind = column.type
    if column.null_count:
        raise DataError(f"{display}: column 'embedding' has {column.null_count} empty rows")
    if pa.types.is_fixed_size_list(kind):
        width = kind.list_size
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and not np.all(lengths == width):
            row = int(np.flatnonzero(lengths != width)[0])
            raise DataError(f"{display}: column 'embedding' has rows of different lengths "
                            f"(row 0 has {width} values, row {row} has {int(lengths[row])})")
    else:
        raise DataError(f"{display}: column 'embedding' must be a list of floats, not {kind}")
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    # Arrow buffers are read-only and torch tensors expect writable memory.
    return values if values.flags.writeable else values.copy()


def _load_parquet(files: _FeatureFiles) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    import pyarrow.parquet as pq

    arrays: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    columns = {
        "items.parquet": ("items", {"split": "split", "label": "item_labels"}),
        "texts.parquet": (
            "texts", {"text_to_item": "text_to_item", "label": "text_labels"},
        ),
    }
    for name, (embedding_key, extra) in columns.items():
        display = files.folder.display(name)
        try:
            table = pq.read_table(files.fetch(name))
        except (OSError, ValueError) as error:
            raise DataError(f"{display} is not a valid Parquet file: {error}") from error
        arrays[embedding_key] = _parquet_embeddings(table, display)
        origin[embedding_key] = display
        for column, key in extra.items():
            if column in table.column_names:
                arrays[key] = table.column(column).to_numpy(zero_copy_only=False)
                origin[key] = display
        if embedding_key == "items" and "split" not in arrays:
            raise DataError(f"{display} has no column 'split' (0 = train, 1 = test)")
        if embedding_key == "texts" and "text_to_item" not in arrays:
            raise DataError(f"{display} has no column 'text_to_item'")
    return arrays, origin


def _read_arrays(files: _FeatureFiles) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read the layout's arrays; returns (key -> array, key -> file shown in errors)."""
    if files.layout == "parquet":
        return _load_parquet(files)

    if files.layout == "npy":
        arrays = {}
        origin = {}
        for name in files.main:
            key = name.removesuffix(".npy")
            display = files.folder.display(name)
            arrays[key] = _load_npy(files.fetch(name), display)
            origin[key] = display
        return arrays, origin

    name = files.main[0]
    display = files.folder.display(name)
    loader = _load_npz if files.layout == "npz" else _load_safetensors
    arrays = loader(files.fetch(name), display)
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise DataError(f"{display} has no array {missing[0]!r} (found: "
                        f"{', '.join(sorted(arrays)) or 'nothing'}); expected "
                        f"{', '.join(ARRAY_KEYS)}")
    return arrays, {key: f"{display} [{key}]" for key in arrays}


# --------------------------------------------------------------------------------------
# features: validation and assembly
# --------------------------------------------------------------------------------------


def _check_embeddings(array: np.ndarray, display: str) -> np.ndarray:
    """Check an (R, D) embedding array and return it as float32 (no copy when it is)."""
    if array.ndim != 2:
        raise DataError(f"{display} must be a 2-D array (rows, dim) but has shape "
                        f"{array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{display} is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{display} must hold numbers but has dtype {array.dtype}")
    array = np.asarray(array, dtype=np.float32)
    for start in range(0, array.shape[0], CHUNK_ROWS):
        block = array[start : start + CHUNK_ROWS]
        finite = np.isfinite(block)
        if not finite.all():
            first_row = start + int(np.flatnonzero(~finite.all(axis=1))[0])
            total = 0
            for offset in range(start, array.shape[0], CHUNK_ROWS):
                chunk = array[offset : offset + CHUNK_ROWS]
                total += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
            raise DataError(
                f"{display} contains {total} non-finite values (NaN or infinite), first in "
                f"row {first_row}; clean or drop those rows"
            )
    return array


def _check_index_array(array: np.ndarray, display: str, *, length: int, name: str) -> np.ndarray:
    if array.ndim != 1:
        raise DataError(f"{display} must be 1-D but has shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{display} must hold integers but has dtype {array.dtype}")
    if len(array) != length:
        raise DataError(f"{display} has {len(array)} entries but {name} has {length} rows; "
                        f"they must match")
    return array.astype(np.int64, copy=False)


def _encode_labels(raw: np.ndarray, display: str) -> np.ndarray:
    """Map integer or string labels to int64 codes 0..K-1 (sorted label order)."""
    if raw.ndim != 1:
        raise DataError(f"{display} must be 1-D but has shape {raw.shape}")
    if raw.dtype.kind not in "iuUSb":
        if raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)):
            raw = raw.astype(np.int64)
        elif raw.dtype.kind == "O" and all(isinstance(value, str) for value in raw):
            raw = raw.astype(str)
        else:
            raise DataError(f"{display} has dtype {raw.dtype}; labels must be integers or "
                            f"strings")
    _, codes = np.unique(raw, return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


@dataclass
class _Concepts:
    """Concept information of a features dataset, in the global row order."""

    counts: np.ndarray | None = None  # (M,) counts fixed by a class CSV
    concept_codes: np.ndarray | None = None  # (M,) concept per caption, for counting
    item_labels: np.ndarray | None = None  # (N,) class label per item, for mAP and nDCG
    text_labels: np.ndarray | None = None  # (M,) class label per caption


def _layout_labels(
    arrays: dict[str, np.ndarray], origin: dict[str, str], n_items: int,
    text_to_item: np.ndarray,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Return (raw text labels, item codes, text codes) from the layout, or Nones."""
    n_texts = len(text_to_item)
    item_raw = arrays.get("item_labels")
    text_raw = arrays.get("text_labels")
    generic = arrays.get("labels")
    if generic is not None:
        if len(generic) == n_items and item_raw is None:
            item_raw, origin["item_labels"] = generic, origin["labels"]
        elif len(generic) == n_texts and text_raw is None:
            text_raw, origin["text_labels"] = generic, origin["labels"]
        elif len(generic) not in (n_items, n_texts):
            raise DataError(f"{origin['labels']} has {len(generic)} entries but there are "
                            f"{n_items} items and {n_texts} captions; labels must be per "
                            f"item or per caption")
    if item_raw is not None and len(item_raw) != n_items:
        raise DataError(f"{origin['item_labels']} has {len(item_raw)} entries but items "
                        f"has {n_items} rows; they must match")
    if text_raw is not None and len(text_raw) != n_texts:
        raise DataError(f"{origin['text_labels']} has {len(text_raw)} entries but texts "
                        f"has {n_texts} rows; they must match")
    if item_raw is None and text_raw is None:
        return None, None, None

    if text_raw is None:
        assert item_raw is not None
        text_raw = item_raw[text_to_item]
        origin["text_labels"] = origin["item_labels"]
    if item_raw is not None:
        both = np.concatenate([np.asarray(item_raw), np.asarray(text_raw)])
        codes = _encode_labels(both, origin["item_labels"])
        return text_raw, codes[:n_items], codes[n_items:]

    text_codes = _encode_labels(np.asarray(text_raw), origin["text_labels"])
    # NOTE: with labels per caption only, an item takes the label of its first caption.
    # An item whose captions disagree is then judged by that first label in mAP and nDCG.
    item_codes = np.full(n_items, -1, dtype=np.int64)
    described, first = np.unique(text_to_item, return_index=True)
    item_codes[described] = text_codes[first]
    return text_raw, item_codes, text_codes


def _name_file(error: Exception, local: Path, display: str) -> str:
    """Return the error message with the cached path of an S3 file replaced by its URL."""
    message = str(error).replace(str(local), display)
    return message if display in message else f"{display}: {message}"


def _read_concepts(
    ds: DatasetSpec, files: _FeatureFiles, arrays: dict[str, np.ndarray],
    origin: dict[str, str], n_items: int, text_to_item: np.ndarray, seed: int,
) -> _Concepts:
    """Read the concept labels or counts that ``ds.concepts`` selects."""
    from mmts_search import concepts as concept_tools

    source = getattr(ds, "concepts", None)
    kind = source.kind if source is not None else None
    n_texts = len(text_to_item)

    if kind == "labels" and files.concept_file is not None:
        display, local = files.fetch_concept_file()
        loaded = _load_npz(local, display) if display.endswith(".npz") else {
            "labels": _load_npy(local, display)}
        if "labels" not in loaded:
            raise DataError(f"{display} has no array 'labels'")
        arrays = {**arrays, "labels": loaded["labels"]}
        origin = {**origin, "labels": display}
        arrays.pop("item_labels", None)
        arrays.pop("text_labels", None)

    text_raw, item_codes, text_codes = _layout_labels(arrays, dict(origin), n_items,
                                                      text_to_item)

    if kind == "captions":
        display, local = files.fetch_concept_file()
        try:
            captions = concept_tools.read_captions(local)
        except (ValueError, OSError) as error:
            raise DataError(_name_file(error, local, display)) from error
        if len(captions) != n_texts:
            raise DataError(f"{display} has {len(captions)} captions but texts has {n_texts} "
                            f"rows; they must match, one caption per row")
        clusters = concept_tools.cluster_captions(
            captions, n_clusters=int(source.clusters), seed=seed
        )
        # Cluster ids from K-Means are no ground truth: they drive the counts, while
        # class-relevance metrics use the layout labels when there are any.
        return _Concepts(
            concept_codes=np.asarray(clusters.labels, dtype=np.int64).reshape(-1),
            item_labels=item_codes, text_labels=text_codes,
        )

    if kind in ("labels", "class_csv") and text_codes is None:
        raise DataError(
            f"dataset {ds.name!r}: concepts.kind is {kind!r} but the features have no "
            f"labels; add labels.npy (or a labels key/column) or set concepts.path"
        )

    if kind == "class_csv":
        display, local = files.fetch_concept_file()
        try:
            counts = concept_tools.counts_from_class_csv(np.asarray(text_raw), local)
        except (ValueError, OSError) as error:
            raise DataError(_name_file(error, local, display)) from error
        return _Concepts(
            counts=np.asarray(counts, dtype=np.float32).reshape(-1),
            item_labels=item_codes, text_labels=text_codes,
        )

    if text_codes is None:
        logger.warning(
            "dataset %s has no concept labels and no concepts setting: every caption is its "
            "own concept (count 1), so the MM-TS cluster shift is the same for all samples",
            ds.name,
        )
        return _Concepts()
    return _Concepts(concept_codes=text_codes, item_labels=item_codes, text_labels=text_codes)


def _rows(indices: np.ndarray) -> slice | np.ndarray:
    """Return a slice when ``indices`` is one contiguous ascending run (no copy needed)."""
    if len(indices) and indices[-1] - indices[0] + 1 == len(indices):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


def _take(tensor: torch.Tensor, rows: slice | np.ndarray) -> torch.Tensor:
    if isinstance(rows, slice):
        return tensor[rows]
    return tensor[torch.from_numpy(rows)]


def load_features(ds: DatasetSpec, *, seed: int, device: torch.device | str = "cpu") -> TrialData:
    """Read and check a features dataset (layout in the module docstring)."""
    device = torch.device(device)
    files = _FeatureFiles.resolve(ds)
    arrays, origin = _read_arrays(files)

    items = _check_embeddings(arrays["items"], origin["items"])
    texts = _check_embeddings(arrays["texts"], origin["texts"])
    n_items, n_texts = items.shape[0], texts.shape[0]
    text_to_item = _check_index_array(arrays["text_to_item"], origin["text_to_item"],
                                      length=n_texts, name="texts")
    split = _check_index_array(arrays["split"], origin["split"], length=n_items,
                               name="items")

    out_of_range = (text_to_item < 0) | (text_to_item >= n_items)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise DataError(
            f"{origin['text_to_item']} has index {int(text_to_item[row])} at row {row}, "
            f"out of range: items has {n_items} rows (valid 0 to {n_items - 1})"
        )
    invalid_split = (split != 0) & (split != 1)
    if invalid_split.any():
        row = int(np.flatnonzero(invalid_split)[0])
        raise DataError(f"{origin['split']} has value {int(split[row])} at row {row}; "
                        f"allowed values are 0 (train) and 1 (test)")

    text_split = split[text_to_item]
    train_items, test_items = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
    train_texts, test_texts = np.flatnonzero(text_split == 0), np.flatnonzero(text_split == 1)
    for split_name, item_rows, text_rows, minimum in (
        ("train", train_items, train_texts, 2), ("test", test_items, test_texts, 1),
    ):
        if len(item_rows) == 0 or len(text_rows) < minimum:
            raise DataError(
                f"{origin['split']}: the {split_name} split is empty ({len(item_rows)} items, "
                f"{len(text_rows)} captions; need at least 1 item and {minimum} caption(s))"
            )
    captions_per_item = np.bincount(text_to_item, minlength=n_items)
    silent = test_items[captions_per_item[test_items] == 0]
    if len(silent):
        raise DataError(
            f"{origin['text_to_item']}: {len(silent)} test items have no caption (first: "
            f"item {int(silent[0])}); every test item needs one for image-to-text recall"
        )

    concepts = _read_concepts(ds, files, arrays, origin, n_items, text_to_item, seed)
    if concepts.counts is not None:
        all_counts = concepts.counts
    elif concepts.concept_codes is not None:
        codes = concepts.concept_codes
        train_freq = np.bincount(codes[train_texts], minlength=int(codes.max()) + 1)
        all_counts = train_freq[codes].astype(np.float32)
    else:
        all_counts = np.ones(n_texts, dtype=np.float32)

    local_index = np.zeros(n_items, dtype=np.int64)
    local_index[train_items] = np.arange(len(train_items))
    local_index[test_items] = np.arange(len(test_items))
    items_tensor = torch.from_numpy(items)
    texts_tensor = torch.from_numpy(texts)

    def build_split(item_rows: np.ndarray, text_rows: np.ndarray) -> SplitData:
        labelled = concepts.item_labels is not None and concepts.text_labels is not None
        return SplitData(
            item_inputs=_take(items_tensor, _rows(item_rows)).to(device),
            text_inputs=_take(texts_tensor, _rows(text_rows)).to(device),
            text_to_item=torch.from_numpy(local_index[text_to_item[text_rows]]).to(device),
            counts=torch.from_numpy(np.ascontiguousarray(all_counts[text_rows])).to(device),
            item_labels=(torch.from_numpy(concepts.item_labels[item_rows]).to(device)
                         if labelled else None),
            text_labels=(torch.from_numpy(concepts.text_labels[text_rows]).to(device)
                         if labelled else None),
        )

    train = build_split(train_items, train_texts)
    test = build_split(test_items, test_texts)
    return TrialData(
        name=ds.name,
        kind="features",
        train=train,
        test=test,
        item_dim=int(items.shape[1]),
        text_dim=int(texts.shape[1]),
        vocab_size=0,
        item_shape=(int(items.shape[1]),),
        files=files.used_files(),
    )
