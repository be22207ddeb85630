"""Datasets of a trial: digits-lt, synthetic-lt and the feature layout (local and S3)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmts_search.spec import ConceptSource, DatasetSpec
from workers import data as data_module
from workers.data import (
    DIGIT_PHRASINGS,
    DataError,
    digit_captions,
    fingerprint_dataset,
    load_dataset,
    long_tail_sizes,
    make_digits_lt,
    make_synthetic_lt,
    zipf_sizes,
)

# --------------------------------------------------------------------------------------
# builtin:digits-lt
# --------------------------------------------------------------------------------------


def decode(tokens: torch.Tensor, vocab: list[str]) -> str:
    return " ".join(vocab[int(token)] for token in tokens if int(token) != 0)


def test_long_tail_sizes_follow_formula():
    sizes = long_tail_sizes(144, 10, 10.0)
    expected = np.floor(144 * 10.0 ** (-np.arange(10) / 9) + 1e-9).astype(int)
    assert sizes.tolist() == expected.tolist()
    assert sizes[0] == 144
    assert sizes[-1] == 14
    assert long_tail_sizes(50, 4, 1.0).tolist() == [50, 50, 50, 50]


def test_digits_lt_splits():
    data = make_digits_lt(imbalance_ratio=10, test_per_class=30, seed=0)
    train_sizes = torch.bincount(data.train.item_labels, minlength=10)
    test_sizes = torch.bincount(data.test.item_labels, minlength=10)

    assert data.kind == "raw"
    assert test_sizes.tolist() == [30] * 10
    assert train_sizes.tolist() == sorted(train_sizes.tolist(), reverse=True)
    assert train_sizes[0] / train_sizes[-1] == pytest.approx(10, rel=0.1)
    assert data.train.item_inputs.shape == (int(train_sizes.sum()), 1, 8, 8)
    assert data.train.item_inputs.dtype == torch.float32
    assert float(data.train.item_inputs.max()) <= 1.0
    assert data.item_shape == (1, 8, 8)
    assert data.item_dim == 64
    assert data.has_labels


def test_digits_lt_counts_are_train_class_sizes():
    data = make_digits_lt(seed=1)
    train_sizes = torch.bincount(data.train.item_labels, minlength=10).float()

    assert torch.equal(data.train.counts, train_sizes[data.train.text_labels])
    assert torch.equal(data.test.counts, train_sizes[data.test.text_labels])
    assert torch.equal(data.train_counts, data.train.counts)
    assert torch.equal(data.train_text_to_item, torch.arange(data.train.num_texts))


def test_digits_lt_captions_describe_class():
    data = make_digits_lt(seed=2)
    used = set()
    for split in (data.train, data.test):
        for tokens, label in zip(split.text_inputs, split.text_labels, strict=True):
            caption = decode(tokens, data.vocab)
            assert caption in digit_captions(int(label))
            used.add(caption)

    assert len(used) > 5 * 10  # most phrasings of most digits occur
    assert "the digit three" in digit_captions(3)
    assert "a handwritten 3" in digit_captions(3)
    assert len(digit_captions(0)) == len(DIGIT_PHRASINGS)
    assert data.vocab[0] == ""
    assert data.vocab_size == len(data.vocab)


def test_digits_lt_seeded():
    first, again, other = make_digits_lt(seed=3), make_digits_lt(seed=3), make_digits_lt(seed=4)

    assert torch.equal(first.train.item_inputs, again.train.item_inputs)
    assert torch.equal(first.train.text_inputs, again.train.text_inputs)
    assert not torch.equal(first.test.item_inputs, other.test.item_inputs)


def test_digits_lt_dataset_seed_overrides_trial_seed():
    spec = DatasetSpec(name="d", source="builtin:digits-lt", seed=7)
    from_spec = load_dataset(spec, seed=0)
    direct = make_digits_lt(seed=7)

    assert torch.equal(from_spec.train.item_inputs, direct.train.item_inputs)


def test_digits_lt_rejects_large_test_split():
    with pytest.raises(DataError, match="test_per_class must be between 1 and 173"):
        make_digits_lt(test_per_class=174)


# --------------------------------------------------------------------------------------
# builtin:synthetic-lt
# --------------------------------------------------------------------------------------


def test_zipf_sizes_sum_and_order():
    sizes = zipf_sizes(1000, 20, 1.1)

    assert sizes.sum() == 1000
    assert sizes.min() >= 1
    assert sizes.tolist() == sorted(sizes.tolist(), reverse=True)
    with pytest.raises(DataError, match="n_concepts <= n_items"):
        zipf_sizes(5, 10, 1.0)


def test_synthetic_lt_shapes_and_counts():
    data = make_synthetic_lt(n_items=600, dim=16, n_concepts=12, captions_per_item=3,
                             test_fraction=0.25, seed=0)

    assert data.kind == "features"
    assert data.test.num_items == 150
    assert data.train.num_items == 450
    assert data.train.num_texts == 3 * 450
    assert data.train.item_inputs.dtype == torch.float32
    assert data.train.text_inputs.shape == (1350, 16)
    assert torch.equal(data.train.text_to_item, torch.arange(1350) // 3)
    assert torch.equal(data.train.text_labels, data.train.item_labels[data.train.text_to_item])

    train_freq = torch.bincount(data.train.text_labels, minlength=12).float()
    assert torch.equal(data.train.counts, train_freq[data.train.text_labels])
    assert torch.equal(data.test.counts, train_freq[data.test.text_labels])
    assert data.train.counts.max() > 5 * data.train.counts.min()


def test_synthetic_lt_splits_share_storage():
    data = make_synthetic_lt(n_items=100, dim=8, n_concepts=5, seed=0)

    def storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    assert storage(data.train.item_inputs) == storage(data.test.item_inputs)
    assert storage(data.train.text_inputs) == storage(data.test.text_inputs)


def test_synthetic_lt_captions_match_items():
    data = make_synthetic_lt(n_items=400, dim=32, n_concepts=4, noise=0.1, seed=0)
    items = torch.nn.functional.normalize(data.test.item_inputs, dim=1)
    texts = torch.nn.functional.normalize(data.test.text_inputs, dim=1)

    # The two modalities are different maps of the same latent points, so a linear
    # least-squares map from one to the other recovers the pairing far above chance.
    solution = torch.linalg.lstsq(data.train.item_inputs, data.train.text_inputs).solution
    predicted = torch.nn.functional.normalize(data.test.item_inputs @ solution, dim=1)
    hits = (predicted @ texts.T).argmax(1) == torch.arange(data.test.num_items)
    assert hits.float().mean() > 0.5
    assert items.shape == texts.shape


def test_synthetic_lt_seeded():
    first = make_synthetic_lt(n_items=200, dim=8, n_concepts=5, seed=5)
    again = make_synthetic_lt(n_items=200, dim=8, n_concepts=5, seed=5)
    other = make_synthetic_lt(n_items=200, dim=8, n_concepts=5, seed=6)

    assert torch.equal(first.train.item_inputs, again.train.item_inputs)
    assert torch.equal(first.train.text_inputs, again.train.text_inputs)
    assert not torch.equal(first.train.item_inputs, other.train.item_inputs)


SYNTHETIC_MEMORY_SCRIPT = """
import json, resource, sys
import torch
from workers.data import make_synthetic_lt
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
data = make_synthetic_lt(n_items=int(sys.argv[1]), dim=int(sys.argv[2]), n_concepts=100)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_increase": after - before}))
"""


def test_synthetic_lt_memory_one_copy_per_modality():
    n_items, dim = 100_000, 512
    result = subprocess.run(
        [sys.executable, "-c", SYNTHETIC_MEMORY_SCRIPT, str(n_items), str(dim)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    peak_increase = json.loads(result.stdout.strip().splitlines()[-1])["peak_increase"]
    one_copy_each = 2 * n_items * dim * 4  # items and captions, float32

    # Generation chunks and index tensors add a few dozen MiB; a second full copy of
    # either modality would add 195 MiB.
    assert peak_increase < one_copy_each + 128 * 2**20


# --------------------------------------------------------------------------------------
# features: layouts
# --------------------------------------------------------------------------------------


def make_arrays(n_items: int = 40, per_item: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_texts = n_items * per_item
    split = np.zeros(n_items, dtype=np.int64)
    split[rng.permutation(n_items)[: n_items // 4]] = 1
    labels = np.arange(n_items) % 5
    return {
        "items": rng.normal(size=(n_items, 6)).astype(np.float32),
        "texts": rng.normal(size=(n_texts, 5)).astype(np.float32),
        "text_to_item": rng.permutation(np.repeat(np.arange(n_items), per_item)),
        "split": split,
        "labels": labels,
    }


def write_layout(folder: Path, arrays: dict[str, np.ndarray], layout: str) -> str:
    """Write ``arrays`` in one layout; returns the dataset path to use."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "npy":
        for key, value in arrays.items():
            np.save(folder / f"{key}.npy", value)
        return str(folder)
    if layout == "npz":
        np.savez(folder / "features.npz", **arrays)
        return str(folder)
    if layout == "npz-file":
        np.savez(folder / "mine.npz", **arrays)
        return str(folder / "mine.npz")
    if layout == "safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                  str(folder / "features.safetensors"))
        return str(folder)
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        item_label = arrays["labels"]
        pq.write_table(pa.table({
            "embedding": list(arrays["items"]),
            "split": arrays["split"],
            "label": item_label,
        }), folder / "items.parquet")
        pq.write_table(pa.table({
            "embedding": list(arrays["texts"]),
            "text_to_item": arrays["text_to_item"],
        }), folder / "texts.parquet")
        return str(folder)
    raise AssertionError(layout)


def expected_split(arrays: dict[str, np.ndarray], split_id: int) -> dict[str, np.ndarray]:
    split, text_to_item = arrays["split"], arrays["text_to_item"]
    item_rows = np.flatnonzero(split == split_id)
    text_rows = np.flatnonzero(split[text_to_item] == split_id)
    local = np.full(len(split), -1)
    local[item_rows] = np.arange(len(item_rows))
    train_texts = np.flatnonzero(split[text_to_item] == 0)
    freq = np.bincount(arrays["labels"][text_to_item][train_texts], minlength=5)
    return {
        "items": arrays["items"][item_rows],
        "texts": arrays["texts"][text_rows],
        "text_to_item": local[text_to_item[text_rows]],
        "labels": arrays["labels"][item_rows],
        "counts": freq[arrays["labels"][text_to_item[text_rows]]].astype(np.float32),
    }


def assert_matches(data: data_module.TrialData, arrays: dict[str, np.ndarray]) -> None:
    for split, split_id in ((data.train, 0), (data.test, 1)):
        expected = expected_split(arrays, split_id)
        np.testing.assert_array_equal(split.item_inputs.numpy(), expected["items"])
        np.testing.assert_array_equal(split.text_inputs.numpy(), expected["texts"])
        np.testing.assert_array_equal(split.text_to_item.numpy(), expected["text_to_item"])
        np.testing.assert_array_equal(split.counts.numpy(), expected["counts"])
        assert split.item_labels is not None
        np.testing.assert_array_equal(split.item_labels.numpy(), expected["labels"])


def features_spec(path: str, **extra) -> DatasetSpec:
    return DatasetSpec(name="feats", source="features", path=path, **extra)


@pytest.mark.parametrize("layout", ["npy", "npz", "npz-file", "safetensors", "parquet"])
def test_features_round_trip(tmp_path, layout):
    arrays = make_arrays()
    path = write_layout(tmp_path / layout, arrays, layout)
    data = load_dataset(features_spec(path), seed=0)

    assert data.kind == "features"
    assert data.item_dim == 6
    assert data.text_dim == 5
    assert data.has_labels
    assert_matches(data, arrays)


def test_features_contiguous_split_is_a_view(tmp_path):
    arrays = make_arrays()
    arrays["split"] = (np.arange(40) >= 30).astype(np.int64)
    data = load_dataset(features_spec(write_layout(tmp_path, arrays, "npy")), seed=0)

    assert data.train.item_inputs.untyped_storage().data_ptr() == \
        data.test.item_inputs.untyped_storage().data_ptr()
    assert_matches(data, arrays)


def test_features_string_labels_per_caption(tmp_path):
    arrays = make_arrays()
    text_labels = np.array([f"noun_{value}" for value in
                            arrays.pop("labels")[arrays["text_to_item"]]])
    write_layout(tmp_path, arrays, "npy")
    np.save(tmp_path / "text_labels.npy", text_labels)
    data = load_dataset(features_spec(str(tmp_path)), seed=0)

    expected_items = np.arange(40)[arrays["split"] == 1] % 5
    np.testing.assert_array_equal(data.test.item_labels.numpy(), expected_items)
    assert data.test.text_labels is not None
    assert data.train.counts.min() >= 1


def test_features_without_labels_count_one(tmp_path, caplog):
    arrays = make_arrays()
    del arrays["labels"]
    data = load_dataset(features_spec(write_layout(tmp_path, arrays, "npy")), seed=0)

    assert torch.equal(data.train.counts, torch.ones(data.train.num_texts))
    assert not data.has_labels
    assert "no concept labels" in caplog.text


def test_features_class_csv_counts(tmp_path):
    arrays = make_arrays()
    write_layout(tmp_path, arrays, "npy")
    csv_counts = {0: 500, 1: 120, 2: 40, 3: 9, 4: 2}
    lines = ["class_id,count", *(f"{key},{value}" for key, value in csv_counts.items())]
    csv_file = tmp_path / "concept_counts.csv"
    csv_file.write_text("\n".join(lines) + "\n")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(kind="class_csv",
                                                                  path=str(csv_file)))
    data = load_dataset(spec, seed=0)

    labels = arrays["labels"][arrays["text_to_item"]]
    train_texts = arrays["split"][arrays["text_to_item"]] == 0
    expected = np.array([csv_counts[label] for label in labels[train_texts]], dtype=np.float32)
    np.testing.assert_array_equal(data.train.counts.numpy(), expected)
    assert data.has_labels


def test_features_caption_clusters(tmp_path):
    arrays = make_arrays()
    write_layout(tmp_path, arrays, "npy")
    topics = ["a dog runs on grass", "a red car on the road", "a bowl of soup",
              "a child plays football", "a boat on the lake"]
    captions = [topics[label] for label in arrays["labels"][arrays["text_to_item"]]]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(
        kind="captions", path=str(tmp_path / "captions.txt"), clusters=5))
    data = load_dataset(spec, seed=0)

    # Identical captions share a cluster, so the counts equal the label frequencies.
    expected_counts = expected_split(arrays, 0)["counts"]
    np.testing.assert_array_equal(data.train.counts.numpy(), expected_counts)
    assert data.has_labels  # the layout labels stay the class labels


def test_features_labels_file_from_concepts_path(tmp_path):
    arrays = make_arrays()
    labels = arrays.pop("labels")
    write_layout(tmp_path / "layout", arrays, "npy")
    np.save(tmp_path / "my_labels.npy", labels)
    spec = features_spec(str(tmp_path / "layout"), concepts=ConceptSource(
        kind="labels", path=str(tmp_path / "my_labels.npy")))
    data = load_dataset(spec, seed=0)

    assert_matches(data, {**arrays, "labels": labels})


def test_features_on_device_argument(tmp_path):
    arrays = make_arrays()
    data = load_dataset(features_spec(write_layout(tmp_path, arrays, "npz")), seed=0,
                        device=torch.device("cpu"))
    assert data.train.item_inputs.device.type == "cpu"


def test_fingerprint_local_files(tmp_path):
    arrays = make_arrays()
    path = write_layout(tmp_path, arrays, "npy")
    fingerprints = fingerprint_dataset(features_spec(path))

    assert set(fingerprints) == {str(tmp_path / f"{key}.npy") for key in arrays}
    for name, digest in fingerprints.items():
        assert digest == hashlib.sha256(Path(name).read_bytes()).hexdigest()
    assert fingerprint_dataset(DatasetSpec(name="d", source="builtin:digits-lt")) == {}


def test_fingerprint_includes_concept_file(tmp_path):
    arrays = make_arrays()
    write_layout(tmp_path, arrays, "npz")
    csv_file = tmp_path / "concept_counts.csv"
    csv_file.write_text("class_id,count\n0,5\n1,4\n2,3\n3,2\n4,1\n")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(kind="class_csv",
                                                                  path=str(csv_file)))

    assert set(fingerprint_dataset(spec)) == {str(tmp_path / "features.npz"),
                                              str(tmp_path / "concept_counts.csv")}


# --------------------------------------------------------------------------------------
# features: broken data
# --------------------------------------------------------------------------------------


def _drop(key):
    def change(arrays):
        del arrays[key]
    return change


def _set(key, factory):
    def change(arrays):
        arrays[key] = factory(arrays)
    return change


def _poke(key, row, value):
    def change(arrays):
        arrays[key] = arrays[key].copy()
        arrays[key][row] = value
    return change


BAD_DATA_CASES = {
    "short text_to_item": (
        _set("text_to_item", lambda a: a["text_to_item"][:-1]),
        ["text_to_item.npy", "79 entries but texts has 80 rows"],
    ),
    "long split": (
        _set("split", lambda a: np.append(a["split"], 0)),
        ["split.npy", "41 entries but items has 40 rows"],
    ),
    "nan item": (
        _poke("items", (3, 2), np.nan),
        ["items.npy", "1 non-finite values (NaN or infinite), first in row 3"],
    ),
    "inf caption": (
        _poke("texts", (7, 0), np.inf),
        ["texts.npy", "non-finite", "row 7"],
    ),
    "index out of range": (
        _poke("text_to_item", 5, 40),
        ["text_to_item.npy", "index 40 at row 5, out of range", "valid 0 to 39"],
    ),
    "negative index": (
        _poke("text_to_item", 0, -1),
        ["text_to_item.npy", "index -1 at row 0, out of range"],
    ),
    "empty test split": (
        _set("split", lambda a: np.zeros_like(a["split"])),
        ["split.npy", "the test split is empty"],
    ),
    "empty train split": (
        _set("split", lambda a: np.ones_like(a["split"])),
        ["split.npy", "the train split is empty"],
    ),
    "unknown split value": (
        _poke("split", 2, 2),
        ["split.npy", "value 2 at row 2", "0 (train) and 1 (test)"],
    ),
    "missing file": (
        _drop("split"),
        ["feature file not found", "split.npy"],
    ),
    "one-dimensional items": (
        _set("items", lambda a: a["items"][:, 0]),
        ["items.npy", "must be a 2-D array"],
    ),
    "float index": (
        _set("text_to_item", lambda a: a["text_to_item"].astype(np.float32)),
        ["text_to_item.npy", "must hold integers"],
    ),
    "labels of wrong length": (
        _set("labels", lambda a: a["labels"][:7]),
        ["labels.npy", "7 entries", "per item or per caption"],
    ),
    "test item without caption": (
        _set("text_to_item", lambda a: np.where(
            a["text_to_item"] == np.flatnonzero(a["split"] == 1)[0],
            np.flatnonzero(a["split"] == 0)[0], a["text_to_item"])),
        ["text_to_item.npy", "1 test items have no caption"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA_CASES))
def test_bad_feature_data(tmp_path, case):
    change, fragments = BAD_DATA_CASES[case]
    arrays = make_arrays()
    change(arrays)
    write_layout(tmp_path, arrays, "npy")

    with pytest.raises(DataError) as raised:
        load_dataset(features_spec(str(tmp_path)), seed=0)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_bad_folder_missing(tmp_path):
    with pytest.raises(DataError, match="feature folder not found: .*nowhere"):
        load_dataset(features_spec(str(tmp_path / "nowhere")), seed=0)


def test_bad_folder_without_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no feature files found in .*features.npz"):
        load_dataset(features_spec(str(tmp_path)), seed=0)


def test_bad_npz_missing_key(tmp_path):
    arrays = make_arrays()
    del arrays["split"]
    write_layout(tmp_path, arrays, "npz")
    with pytest.raises(DataError, match=r"features.npz has no array 'split'"):
        load_dataset(features_spec(str(tmp_path)), seed=0)


def test_bad_object_array(tmp_path):
    arrays = make_arrays()
    write_layout(tmp_path, arrays, "npy")
    np.save(tmp_path / "labels.npy", np.array([{"a": 1}] * 40, dtype=object))
    with pytest.raises(DataError, match="labels.npy cannot be read without pickle"):
        load_dataset(features_spec(str(tmp_path)), seed=0)


def test_bad_concept_csv_missing_classes(tmp_path):
    arrays = make_arrays()
    write_layout(tmp_path, arrays, "npy")
    csv_file = tmp_path / "concept_counts.csv"
    csv_file.write_text("class_id,count\n0,50\n1,20\n2,8\n")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(kind="class_csv",
                                                                  path=str(csv_file)))

    with pytest.raises(DataError) as raised:
        load_dataset(spec, seed=0)
    message = str(raised.value)
    assert str(csv_file) in message
    assert "2 label(s) have no row" in message
    assert "3, 4" in message


def test_bad_concept_csv_file_missing(tmp_path):
    write_layout(tmp_path, make_arrays(), "npy")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(
        kind="class_csv", path=str(tmp_path / "counts.csv")))
    with pytest.raises(DataError, match=f"feature file not found: {tmp_path}/counts.csv"):
        load_dataset(spec, seed=0)


def test_bad_class_csv_without_labels(tmp_path):
    arrays = make_arrays()
    del arrays["labels"]
    write_layout(tmp_path, arrays, "npy")
    (tmp_path / "concept_counts.csv").write_text("class_id,count\n0,5\n")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(
        kind="class_csv", path=str(tmp_path / "concept_counts.csv")))
    with pytest.raises(DataError, match="the features have no labels"):
        load_dataset(spec, seed=0)


def test_bad_caption_count(tmp_path):
    write_layout(tmp_path, make_arrays(), "npy")
    (tmp_path / "captions.txt").write_text("only one caption\n")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(
        kind="captions", path=str(tmp_path / "captions.txt"), clusters=2))
    with pytest.raises(DataError, match="captions.txt has 1 captions but texts has 80 rows"):
        load_dataset(spec, seed=0)


# --------------------------------------------------------------------------------------
# features on S3 (a real moto server on 127.0.0.1) and the download cache
# --------------------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_endpoint, tmp_path, monkeypatch):
    """Point the loader at the test endpoint and a fresh cache; count GetObject calls."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint.url)
    monkeypatch.setenv("MMTS_CACHE_DIR", str(tmp_path / "cache"))

    calls: list[str] = []
    original = data_module.make_s3_client

    def counting_client():
        client = original()
        client.meta.events.register(
            "provide-client-params.s3.GetObject", lambda params, **_: calls.append(params["Key"])
        )
        return client

    monkeypatch.setattr(data_module, "make_s3_client", counting_client)
    return calls


def upload_folder(s3_endpoint, folder: Path, prefix: str) -> str:
    bucket = s3_endpoint.create_bucket("feats")
    client = s3_endpoint.client()
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return bucket


def test_s3_round_trip_and_cache(s3_endpoint, s3_env, tmp_path):
    arrays = make_arrays()
    write_layout(tmp_path / "local", arrays, "npy")
    bucket = upload_folder(s3_endpoint, tmp_path / "local", "runs/feats")
    spec = features_spec(f"s3://{bucket}/runs/feats")

    data = load_dataset(spec, seed=0)
    assert_matches(data, arrays)
    assert sorted(s3_env) == sorted(f"runs/feats/{key}.npy" for key in arrays)
    cached = sorted((tmp_path / "cache" / "s3").glob("*/*.npy"))
    assert sorted(path.name for path in cached) == sorted(f"{key}.npy" for key in arrays)

    s3_env.clear()
    again = load_dataset(spec, seed=0)
    assert s3_env == []  # the second load reads the cache only
    assert_matches(again, arrays)


def test_s3_changed_object_downloads_again(s3_endpoint, s3_env, tmp_path):
    arrays = make_arrays()
    path = write_layout(tmp_path / "local", arrays, "npz-file")
    bucket = s3_endpoint.create_bucket("feats")
    client = s3_endpoint.client()
    client.upload_file(path, bucket, "one/mine.npz")
    spec = features_spec(f"s3://{bucket}/one/mine.npz")
    load_dataset(spec, seed=0)

    changed = make_arrays(seed=1)
    path = write_layout(tmp_path / "changed", changed, "npz-file")
    client.upload_file(path, bucket, "one/mine.npz")
    s3_env.clear()
    data = load_dataset(spec, seed=0)

    assert s3_env == ["one/mine.npz"]
    assert_matches(data, changed)


def test_s3_fingerprint_matches_object(s3_endpoint, s3_env, tmp_path):
    arrays = make_arrays()
    path = write_layout(tmp_path / "local", arrays, "npz")
    bucket = upload_folder(s3_endpoint, Path(path), "f")
    fingerprints = fingerprint_dataset(features_spec(f"s3://{bucket}/f"))

    expected = hashlib.sha256((Path(path) / "features.npz").read_bytes()).hexdigest()
    assert fingerprints == {f"s3://{bucket}/f/features.npz": expected}


def test_s3_aws_endpoint_variable_wins(s3_endpoint, s3_env, tmp_path, monkeypatch):
    arrays = make_arrays()
    write_layout(tmp_path / "local", arrays, "npz")
    bucket = upload_folder(s3_endpoint, tmp_path / "local", "p")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    # Port 9 (discard) on the loopback address: nothing listens there.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")

    assert_matches(load_dataset(features_spec(f"s3://{bucket}/p"), seed=0), arrays)


def test_s3_missing_bucket(s3_endpoint, s3_env):
    with pytest.raises(DataError, match="S3 bucket not found: 'no-such-bucket-mmts'"):
        load_dataset(features_spec("s3://no-such-bucket-mmts/feats"), seed=0)


def test_s3_missing_file(s3_endpoint, s3_env, tmp_path):
    arrays = make_arrays()
    del arrays["split"]
    write_layout(tmp_path / "local", arrays, "npy")
    bucket = upload_folder(s3_endpoint, tmp_path / "local", "p")

    with pytest.raises(DataError, match=f"feature file not found: s3://{bucket}/p/split.npy"):
        load_dataset(features_spec(f"s3://{bucket}/p"), seed=0)


def test_s3_empty_prefix(s3_endpoint, s3_env):
    bucket = s3_endpoint.create_bucket("feats")
    with pytest.raises(DataError, match=f"no feature files found in s3://{bucket}/empty"):
        load_dataset(features_spec(f"s3://{bucket}/empty"), seed=0)


# --------------------------------------------------------------------------------------
# Real long-tail class counts (EPIC-KITCHENS-100 nouns)
# --------------------------------------------------------------------------------------


def test_ek100_noun_counts_drive_concepts(shared_data, tmp_path):
    csv_file = shared_data / "ek100" / "ek100_noun_freq.csv"
    table = np.genfromtxt(csv_file, delimiter=",", names=True, dtype=None, encoding="utf-8")
    class_ids = np.asarray(table["class_id"])
    counts = dict(zip(class_ids.tolist(), np.asarray(table["count"]).tolist(), strict=True))

    arrays = make_arrays(n_items=300, per_item=1)
    rng = np.random.default_rng(0)
    arrays["labels"] = rng.choice(class_ids, size=300)
    write_layout(tmp_path, arrays, "npz")
    spec = features_spec(str(tmp_path), concepts=ConceptSource(kind="class_csv",
                                                                  path=str(csv_file)))
    data = load_dataset(spec, seed=0)

    train_texts = np.flatnonzero(arrays["split"][arrays["text_to_item"]] == 0)
    labels = arrays["labels"][arrays["text_to_item"][train_texts]]
    expected = np.array([counts[label] for label in labels], dtype=np.float32)
    np.testing.assert_array_equal(data.train.counts.numpy(), expected)
    assert data.train.counts.max() / data.train.counts.min() > 10
    assert str(csv_file) in fingerprint_dataset(spec)
