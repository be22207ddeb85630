"""Dual encoders: projection heads, small encoders and user model factories."""

from __future__ import annotations

import textwrap

import pytest
import torch

from mmts_search.spec import ModelSpec
from workers.data import make_digits_lt, make_synthetic_lt
from workers.models import (
    BagOfWordsTextEncoder,
    ConvImageEncoder,
    DualEncoder,
    ModelFactoryError,
    ProjectionHead,
    build_model,
    load_factory,
)


@pytest.fixture(scope="module")
def digits():
    return make_digits_lt(seed=0)


@pytest.fixture(scope="module")
def features():
    return make_synthetic_lt(n_items=200, dim=24, n_concepts=5, captions_per_item=2, seed=0)


def batch(data, size=8):
    rows = torch.arange(size)
    return data.train.item_inputs[data.train.text_to_item[rows]], data.train.text_inputs[rows]


def assert_unit_rows(embeddings: torch.Tensor, rows: int, dim: int) -> None:
    assert embeddings.shape == (rows, dim)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(rows))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_projection_heads(features, head):
    model = build_model(ModelSpec(kind="projection", embed_dim=16, hidden_dim=32, head=head),
                        features)
    items, texts = batch(features)
    item_emb, text_emb = model(items, texts)

    assert_unit_rows(item_emb, 8, 16)
    assert_unit_rows(text_emb, 8, 16)
    layers = [module for module in model.item_encoder.modules()
              if isinstance(module, torch.nn.Linear)]
    assert len(layers) == (1 if head == "linear" else 2)


def test_projection_head_rejects_unknown_kind():
    with pytest.raises(ValueError, match="model.head must be 'linear' or 'mlp'"):
        ProjectionHead(4, 2, head="deep")


def test_small_encoders_on_digits(digits):
    model = build_model(ModelSpec(kind="small-encoders", embed_dim=32, hidden_dim=64), digits)
    items, texts = batch(digits)
    item_emb, text_emb = model(items, texts)

    assert isinstance(model.item_encoder, ConvImageEncoder)
    assert isinstance(model.text_encoder, BagOfWordsTextEncoder)
    assert_unit_rows(item_emb, 8, 32)
    assert_unit_rows(text_emb, 8, 32)

    (item_emb * text_emb).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_text_encoder_ignores_padding(digits):
    encoder = BagOfWordsTextEncoder(digits.vocab_size, 8, hidden_dim=16)
    short = torch.tensor([[5, 7, 0, 0]])
    longer_padding = torch.tensor([[5, 7, 0, 0, 0, 0]])
    torch.testing.assert_close(encoder(short), encoder(longer_padding))


@pytest.mark.parametrize(("kind", "fixture", "hint"), [
    ("projection", "digits", "use model.kind 'small-encoders'"),
    ("small-encoders", "features", "use model.kind 'projection'"),
])
def test_model_kind_must_fit_data(kind, fixture, hint, request):
    data = request.getfixturevalue(fixture)
    with pytest.raises(ValueError, match=hint):
        build_model(ModelSpec(kind=kind), data)


# --------------------------------------------------------------------------------------
# User model factories
# --------------------------------------------------------------------------------------

FACTORY_MODULE = '''
import torch
from torch import nn


def good(data, *, embed_dim, width=8):
    if data.kind == "raw":
        items = nn.Sequential(nn.Flatten(), nn.Linear(data.item_dim, embed_dim))
        texts = nn.Sequential(nn.EmbeddingBag(data.vocab_size, width, padding_idx=0),
                              nn.Linear(width, embed_dim))
    else:
        items = nn.Linear(data.item_dim, embed_dim)
        texts = nn.Linear(data.text_dim, embed_dim)
    return items, texts


def one_module(data, *, embed_dim):
    return nn.Linear(data.item_dim, embed_dim)


def three_modules(data, *, embed_dim):
    return nn.Identity(), nn.Identity(), nn.Identity()


def not_modules(data, *, embed_dim):
    return "items", "texts"


def mismatched(data, *, embed_dim):
    return nn.Linear(data.item_dim, embed_dim), nn.Linear(data.text_dim, embed_dim + 1)


def broken_forward(data, *, embed_dim):
    return nn.Linear(data.item_dim + 1, embed_dim), nn.Linear(data.text_dim, embed_dim)


def raises(data, *, embed_dim):
    raise RuntimeError("no weights found")


NOT_CALLABLE = 3
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = f"user_factories_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def factory_spec(path: str, **kwargs) -> ModelSpec:
    return ModelSpec(kind="factory", factory=path, embed_dim=12, factory_kwargs=kwargs)


@pytest.mark.parametrize("fixture", ["digits", "features"])
def test_factory_builds_encoders(factory_module, fixture, request):
    data = request.getfixturevalue(fixture)
    model = build_model(factory_spec(f"{factory_module}:good", width=6), data)
    items, texts = batch(data)
    item_emb, text_emb = model(items, texts)

    assert isinstance(model, DualEncoder)
    assert_unit_rows(item_emb, 8, 12)
    assert_unit_rows(text_emb, 8, 12)
    if data.kind == "raw":
        assert model.text_encoder[0].embedding_dim == 6


FACTORY_ERRORS = {
    "missing module": ("no_such_package_mmts.models:build",
                       "cannot import module 'no_such_package_mmts.models'"),
    "missing function": ("{module}:absent", "has no attribute 'absent'"),
    "not callable": ("{module}:NOT_CALLABLE", "is not callable"),
    "one module": ("{module}:one_module", "returned a Linear"),
    "three modules": ("{module}:three_modules", "returned a tuple of 3"),
    "not modules": ("{module}:not_modules", "two torch.nn.Module objects"),
    "dimension mismatch": ("{module}:mismatched",
                           "item encoder returns 12 dimensions but the text encoder 13"),
    "failing forward": ("{module}:broken_forward", "the encoders fail on a batch of 2"),
    "raising factory": ("{module}:raises", "raised RuntimeError: no weights found"),
}


@pytest.mark.parametrize("case", list(FACTORY_ERRORS))
def test_factory_errors(factory_module, features, case):
    path, message = FACTORY_ERRORS[case]
    path = path.format(module=factory_module)

    with pytest.raises(ModelFactoryError) as raised:
        build_model(factory_spec(path), features)
    assert message in str(raised.value)
    assert path in str(raised.value)


def test_load_factory_rejects_path_without_function():
    # The sweep file validation rejects this too; the worker checks it again because a
    # trial config may come from elsewhere.
    with pytest.raises(ModelFactoryError, match="must look like 'package.module:function'"):
        load_factory("workers.models")


def test_load_factory_returns_function(factory_module):
    function = load_factory(f"{factory_module}:good")
    assert callable(function)
    assert function.__name__ == "good"


def test_factory_check_keeps_training_mode(factory_module, features):
    model = build_model(factory_spec(f"{factory_module}:good"), features)
    assert model.training
