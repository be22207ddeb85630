"""Dual encoders for a trial: projection heads, small encoders and user model factories.

`build_model` reads ``model.kind`` from the sweep file:

- ``projection`` (features data): one head per modality over the precomputed embeddings,
  either ``linear`` (one ``nn.Linear``) or ``mlp`` (Linear, GELU, Linear with
  ``hidden_dim`` units), mapping D1 and D2 to ``embed_dim``.
- ``small-encoders`` (raw data such as ``builtin:digits-lt``): a small convolutional
  network for the images and an embedding-bag network over the caption tokens.
- ``factory``: a user function named ``"package.module:function"`` in ``model.factory``.

User model factory
------------------
The worker imports the function and calls it once per dataset inside the trial::

    item_encoder, text_encoder = factory(data, embed_dim=embed_dim, **factory_kwargs)

- ``data`` is the `workers.data.TrialData` of the dataset: ``data.kind`` ("raw" or
  "features"), ``data.item_shape`` and ``data.item_dim`` (one item), ``data.text_dim``
  (caption length in tokens or embedding size), ``data.vocab_size`` and ``data.vocab``
  (raw captions), and the train and test tensors.
- ``embed_dim`` is ``model.embed_dim`` and ``factory_kwargs`` is ``model.factory_kwargs``.
- It returns two ``nn.Module`` objects. The item encoder maps a batch of items
  ``(B, *item_shape)`` and the text encoder a batch of captions (``(B, L)`` int64 token
  ids, 0 = padding, or ``(B, D2)`` float32 embeddings) to ``(B, E)`` float tensors with
  the same E for both. The wrapper L2-normalizes the outputs, so they need not be
  normalized. The function must be importable on every worker (an installed package or
  a module on ``PYTHONPATH``).

`build_model` runs both encoders once on two training samples and raises
`ModelFactoryError` when the import fails, the function raises, or the result does not
have this form.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mmts_search.spec import ModelSpec
    from workers.data import TrialData

logger = logging.getLogger(__name__)


class ModelFactoryError(ValueError):
    """Raised when a user model factory cannot be imported or returns unusable encoders."""


class DualEncoder(nn.Module):
    """Two encoders whose outputs are L2-normalized into one embedding space.

    Args:
        item_encoder: maps (B, *item_shape) items to (B, E).
        text_encoder: maps (B, L) token ids or (B, D2) caption embeddings to (B, E).
    """

    def __init__(self, item_encoder: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.item_encoder = item_encoder
        self.text_encoder = text_encoder

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        """Return the (B, E) L2-normalized embeddings of a batch of items."""
        return F.normalize(self.item_encoder(items), dim=-1)

    def encode_texts(self, texts: torch.Tensor) -> torch.Tensor:
        """Return the (B, E) L2-normalized embeddings of a batch of captions."""
        return F.normalize(self.text_encoder(texts), dim=-1)

    def forward(
        self, items: torch.Tensor, texts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (B, E) item and caption embeddings of a batch of pairs."""
        return self.encode_items(items), self.encode_texts(texts)


class ProjectionHead(nn.Module):
    """Projection of precomputed (B, in_dim) embeddings to (B, out_dim).

    Args:
        in_dim: input embedding size.
        out_dim: output embedding size.
        head: ``"linear"`` for one linear layer, ``"mlp"`` for Linear, GELU, Linear.
        hidden_dim: width of the hidden layer of the ``mlp`` head.
    """

    def __init__(self, in_dim: int, out_dim: int, *, head: str = "linear",
                 hidden_dim: int = 256) -> None:
        super().__init__()
        if head == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        elif head == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
            )
        else:
            raise ValueError(f"model.head must be 'linear' or 'mlp' but got {head!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvImageEncoder(nn.Module):
    """Small convolutional encoder for (B, C, H, W) images such as 8x8 digits.

    Two 3x3 convolutions (the second with stride 2) and a two-layer MLP.

    Args:
        in_channels: image channels C.
        height: image height H in pixels.
        width: image width W in pixels.
        out_dim: embedding size.
        hidden_dim: width of the MLP layer.
    """

    def __init__(self, in_channels: int, height: int, width: int, out_dim: int, *,
                 hidden_dim: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        flat = 64 * math.ceil(height / 2) * math.ceil(width / 2)
        self.head = nn.Sequential(nn.Linear(flat, hidden_dim), nn.ReLU(),
                                  nn.Linear(hidden_dim, out_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class BagOfWordsTextEncoder(nn.Module):
    """Caption encoder: the mean of word embeddings followed by a two-layer MLP.

    Args:
        vocab_size: number of token ids, including the padding id 0.
        out_dim: embedding size.
        hidden_dim: size of the word embeddings and the MLP layer.
    """

    def __init__(self, vocab_size: int, out_dim: int, *, hidden_dim: int = 256) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, hidden_dim, mode="mean", padding_idx=0)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                  nn.Linear(hidden_dim, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode (B, L) int64 token ids, 0 = padding, into (B, out_dim)."""
        return self.head(self.embedding(tokens))


def build_model(model: ModelSpec, data: TrialData) -> DualEncoder:
    """Build the dual encoder that ``model`` describes for one dataset (on the CPU).

    Raises:
        ValueError: when the model kind does not fit the data kind.
        ModelFactoryError: for a user factory that fails (see the module docstring).
    """
    embed_dim = int(model.embed_dim)
    hidden_dim = int(model.hidden_dim)

    if model.kind == "factory":
        return build_factory_model(str(model.factory or ""), data, embed_dim=embed_dim,
                                   kwargs=dict(model.factory_kwargs or {}))

    if model.kind == "projection":
        if data.kind != "features":
            raise ValueError(
                f"dataset {data.name!r} has raw inputs (images and tokens), but model.kind "
                f"'projection' needs precomputed features; use model.kind 'small-encoders'"
            )
        return DualEncoder(
            ProjectionHead(data.item_dim, embed_dim, head=model.head, hidden_dim=hidden_dim),
            ProjectionHead(data.text_dim, embed_dim, head=model.head, hidden_dim=hidden_dim),
        )

    if model.kind == "small-encoders":
        if data.kind != "raw":
            raise ValueError(
                f"dataset {data.name!r} contains precomputed features, but model.kind "
                f"'small-encoders' needs raw images and captions; use model.kind 'projection'"
            )
        if len(data.item_shape) == 3:
            channels, height, width = data.item_shape
            item_encoder: nn.Module = ConvImageEncoder(channels, height, width, embed_dim,
                                                       hidden_dim=hidden_dim)
        else:
            item_encoder = nn.Sequential(nn.Flatten(), ProjectionHead(
                data.item_dim, embed_dim, head="mlp", hidden_dim=hidden_dim))
        return DualEncoder(
            item_encoder,
            BagOfWordsTextEncoder(data.vocab_size, embed_dim, hidden_dim=hidden_dim),
        )

    raise ValueError(
        f"model.kind must be 'small-encoders', 'projection' or 'factory' but got {model.kind!r}"
    )


def load_factory(path: str) -> Callable[..., Any]:
    """Import a model factory given as ``"package.module:function"``."""
    module_name, separator, attribute = path.partition(":")
    if not separator or not module_name or not attribute:
        raise ModelFactoryError(
            f"model.factory must look like 'package.module:function' but got {path!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelFactoryError(
            f"model.factory {path!r}: cannot import module {module_name!r} ({error}); install "
            f"the package on every worker or add its folder to PYTHONPATH"
        ) from error

    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelFactoryError(
                f"model.factory {path!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ModelFactoryError(f"model.factory {path!r} is not callable "
                                f"(it is a {type(target).__name__})")
    return target


def build_factory_model(path: str, data: TrialData, *, embed_dim: int,
                        kwargs: dict[str, Any]) -> DualEncoder:
    """Call a user model factory and check what it returns (contract in the module docstring)."""
    factory = load_factory(path)
    try:
        result = factory(data, embed_dim=embed_dim, **kwargs)
    except Exception as error:
        raise ModelFactoryError(
            f"model.factory {path!r} raised {type(error).__name__}: {error}"
        ) from error

    if (not isinstance(result, tuple | list) or len(result) != 2
            or not all(isinstance(part, nn.Module) for part in result)):
        described = (f"a {type(result).__name__} of {len(result)}"
                     if isinstance(result, tuple | list) else f"a {type(result).__name__}")
        raise ModelFactoryError(
            f"model.factory {path!r} must return (item_encoder, text_encoder), two "
            f"torch.nn.Module objects, but returned {described}"
        )

    model = DualEncoder(result[0], result[1])
    _check_factory_outputs(path, model, data)
    logger.info("model factory %s built encoders for dataset %s", path, data.name)
    return model


def _check_factory_outputs(path: str, model: DualEncoder, data: TrialData) -> None:
    """Run both encoders on two training samples and check the output shapes."""
    rows = torch.arange(min(2, data.train.num_texts))
    items = data.train.item_inputs[data.train.text_to_item[rows]].cpu()
    texts = data.train.text_inputs[rows].cpu()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = {"item_encoder": model.item_encoder(items),
                       "text_encoder": model.text_encoder(texts)}
    except Exception as error:
        raise ModelFactoryError(
            f"model.factory {path!r}: the encoders fail on a batch of {len(rows)} training "
            f"samples (items {tuple(items.shape)}, captions {tuple(texts.shape)} "
            f"{texts.dtype}): {type(error).__name__}: {error}"
        ) from error
    finally:
        model.train(was_training)

    for name, output in outputs.items():
        well_formed = (isinstance(output, torch.Tensor) and output.dim() == 2
                       and output.shape[0] == len(rows))
        if not well_formed:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ModelFactoryError(
                f"model.factory {path!r}: {name} must return a (B, E) tensor for B = "
                f"{len(rows)} inputs but returned {shape}"
            )
        if not output.is_floating_point():
            raise ModelFactoryError(f"model.factory {path!r}: {name} returned dtype "
                                    f"{output.dtype}; embeddings must be floating point")
    item_width = outputs["item_encoder"].shape[1]
    text_width = outputs["text_encoder"].shape[1]
    if item_width != text_width:
        raise ModelFactoryError(
            f"model.factory {path!r}: the item encoder returns {item_width} dimensions but the "
            f"text encoder {text_width}; both must return the same embedding size"
        )
