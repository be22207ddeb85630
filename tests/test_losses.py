"""Tests of the InfoNCE and max-margin losses against straightforward references."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mmts_search.losses import info_nce, max_margin

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_pair(batch: int, dim: int = 16, *, seed: int = 0, noise: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    text = F.normalize(image + noise * torch.randn(batch, dim, generator=generator), dim=1)
    return image, text


def clip_loss(image: torch.Tensor, text: torch.Tensor, tau: float) -> torch.Tensor:
    logits_per_image = image @ text.T / tau
    logits_per_text = text @ image.T / tau
    targets = torch.arange(image.shape[0])
    image_loss = F.cross_entropy(logits_per_image, targets)
    text_loss = F.cross_entropy(logits_per_text, targets)
    return (image_loss + text_loss) / 2


def per_sample_info_nce_reference(
    image: torch.Tensor, text: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    logits_per_image = (image @ text.T) / tau[:, None]
    logits_per_text = (text @ image.T) / tau[:, None]
    targets = torch.arange(image.shape[0])
    image_loss = F.cross_entropy(logits_per_image, targets)
    text_loss = F.cross_entropy(logits_per_text, targets)
    return (image_loss + text_loss) / 2


def max_margin_pairs_reference(
    image: torch.Tensor, text: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """Enumerate every off-diagonal pair (i, j) in Python."""
    s = text @ image.T
    batch = image.shape[0]
    terms = []
    for i, j in itertools.product(range(batch), repeat=2):
        if i == j:
            continue
        terms.append(torch.relu(margin[i] - s[i, i] + s[i, j]))
        terms.append(torch.relu(margin[i] - s[i, i] + s[j, i]))
    assert len(terms) == 2 * batch * (batch - 1)
    return torch.stack(terms).mean()


def max_margin_index_reference(
    image: torch.Tensor, text: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """Materialize the 2*B*(B-1) hinge terms through index lists."""
    s = text @ image.T
    batch = image.shape[0]
    rows, cols = (~torch.eye(batch, dtype=torch.bool)).nonzero(as_tuple=True)
    positive = s.diagonal()
    text_side = torch.relu(margin[rows] - positive[rows] + s[rows, cols])
    image_side = torch.relu(margin[rows] - positive[rows] + s[cols, rows])
    return torch.cat([text_side, image_side]).mean()


# --- info_nce -------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.07, 0.01, 1.0])
def test_info_nce_scalar_tau_equals_clip_loss(tau: float) -> None:
    image, text = make_pair(32)

    loss = info_nce(image, text, tau)

    assert loss.item() == pytest.approx(clip_loss(image, text, tau).item(), rel=1e-6)


def test_info_nce_zero_dim_tau_is_clip() -> None:
    image, text = make_pair(8)

    loss = info_nce(image, text, torch.tensor(0.05))

    assert loss.item() == pytest.approx(clip_loss(image, text, 0.05).item(), rel=1e-6)


def test_info_nce_per_sample_tau_equals_reference() -> None:
    image, text = make_pair(24, seed=3)
    tau = torch.linspace(0.02, 0.3, 24)

    loss = info_nce(image, text, tau)
    reference = per_sample_info_nce_reference(image, text, tau)

    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_info_nce_per_sample_gradients_equal_reference() -> None:
    image, text = make_pair(12, seed=5)
    tau = torch.linspace(0.03, 0.2, 12)
    image_a, text_a, tau_a = (x.clone().requires_grad_() for x in (image, text, tau))
    # The reference runs in float64, so the differences are the float32 error of info_nce.
    image_b, text_b, tau_b = (x.double().requires_grad_() for x in (image, text, tau))

    info_nce(image_a, text_a, tau_a).backward()
    per_sample_info_nce_reference(image_b, text_b, tau_b).backward()

    torch.testing.assert_close(image_a.grad, image_b.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_a.grad, text_b.grad.float(), rtol=1e-5, atol=1e-5)
    # d loss / d tau = -(d loss / d inv) / tau^2 amplifies float32 rounding by up to 1/0.03^2.
    torch.testing.assert_close(tau_a.grad, tau_b.grad.float(), rtol=1e-4, atol=1e-4)


def test_info_nce_uniform_tau_is_scalar() -> None:
    image, text = make_pair(10)

    per_sample = info_nce(image, text, torch.full((10,), 0.08))
    scalar = info_nce(image, text, 0.08)

    assert per_sample.item() == pytest.approx(scalar.item(), rel=1e-6)


def test_info_nce_rows_use_their_own_tau() -> None:
    """Changing tau[0] changes row 0 of both logit matrices and nothing else."""
    image, text = make_pair(6)
    tau = torch.full((6,), 0.1)
    changed = tau.clone()
    changed[0] = 0.5

    expected = per_sample_info_nce_reference(image, text, changed)

    assert info_nce(image, text, changed).item() == pytest.approx(expected.item(), rel=1e-6)
    assert info_nce(image, text, changed).item() != pytest.approx(
        info_nce(image, text, tau).item(), rel=1e-3
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_info_nce_small_tau_finite(device: str, dtype: torch.dtype) -> None:
    image, text = make_pair(64, dim=32, noise=2.0)
    image = image.to(device=device, dtype=dtype).requires_grad_()
    text = text.to(device=device, dtype=dtype).requires_grad_()
    tau = torch.full((64,), 0.005, device=device)
    tau[::2] = 0.5

    loss = info_nce(image, text, tau)
    loss.backward()

    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert loss.item() > 0
    assert bool(torch.isfinite(image.grad.float()).all())
    assert bool(torch.isfinite(text.grad.float()).all())


def test_info_nce_bfloat16_close_to_float32() -> None:
    image, text = make_pair(32)
    tau = torch.linspace(0.05, 0.1, 32)

    loss_bf16 = info_nce(image.bfloat16(), text.bfloat16(), tau)
    loss_fp32 = info_nce(image, text, tau)

    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=0.05)


def test_info_nce_single_pair_is_zero() -> None:
    image, text = make_pair(1)

    assert info_nce(image, text, 0.1).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    ("image_shape", "text_shape", "message"),
    [
        ((4, 8), (5, 8), r"got \(4, 8\) and \(5, 8\)"),
        ((4, 8), (4, 6), r"got \(4, 8\) and \(4, 6\)"),
        ((8,), (8,), r"got \(8,\) and \(8,\)"),
        ((0, 8), (0, 8), r"at least 1 pairs, got shape \(0, 8\)"),
    ],
)
def test_info_nce_rejects_bad_shapes(image_shape, text_shape, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        info_nce(torch.randn(image_shape), torch.randn(text_shape), 0.1)


def test_info_nce_rejects_integer_embeddings() -> None:
    with pytest.raises(ValueError, match="image_emb must be a floating-point tensor"):
        info_nce(torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2), 0.1)


@pytest.mark.parametrize("tau", [0.0, -0.1, float("nan"), float("inf")])
def test_info_nce_rejects_bad_scalar_tau(tau: float) -> None:
    image, text = make_pair(4)

    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        info_nce(image, text, tau)


def test_info_nce_rejects_bad_tensor_tau() -> None:
    image, text = make_pair(4)

    with pytest.raises(ValueError, match=r"every tau must be finite and > 0, got \[0.0, -1.0\]"):
        info_nce(image, text, torch.tensor([0.1, 0.0, -1.0, 0.2]))


def test_info_nce_rejects_tau_of_wrong_shape() -> None:
    image, text = make_pair(4)

    with pytest.raises(ValueError, match=r"tau must be a scalar or have shape \(4,\).*got \(3,\)"):
        info_nce(image, text, torch.full((3,), 0.1))


# --- max_margin -----------------------------------------------------------------------


def test_max_margin_equals_pair_enumeration() -> None:
    image, text = make_pair(7, seed=2)
    margin = torch.linspace(0.05, 0.4, 7)

    loss = max_margin(image, text, margin)
    reference = max_margin_pairs_reference(image, text, margin)

    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_max_margin_scalar_margin_equals_pair_enumeration() -> None:
    image, text = make_pair(6, seed=4)

    loss = max_margin(image, text, 0.2)
    reference = max_margin_pairs_reference(image, text, torch.full((6,), 0.2))

    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_max_margin_equals_index_reference_with_gradients() -> None:
    image, text = make_pair(64, dim=32, seed=7)
    margin = 0.05 + 0.25 * torch.rand(64, generator=torch.Generator().manual_seed(1))
    image_a, text_a, margin_a = (x.clone().requires_grad_() for x in (image, text, margin))
    image_b, text_b, margin_b = (x.clone().requires_grad_() for x in (image, text, margin))

    loss = max_margin(image_a, text_a, margin_a)
    reference = max_margin_index_reference(image_b, text_b, margin_b)
    loss.backward()
    reference.backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(image_a.grad, image_b.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(text_a.grad, text_b.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(margin_a.grad, margin_b.grad, rtol=1e-4, atol=1e-7)


def test_max_margin_zero_when_pairs_separated() -> None:
    image = torch.eye(4)
    text = torch.eye(4)

    # s_ii = 1 and s_ij = 0, so a margin below 1 leaves every hinge at zero.
    assert max_margin(image, text, 0.5).item() == 0.0
    assert max_margin(image, text, 1.5).item() == pytest.approx(0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_max_margin_bfloat16_finite_gradients(device: str) -> None:
    image, text = make_pair(32, dim=16)
    image = image.to(device=device, dtype=torch.bfloat16).requires_grad_()
    text = text.to(device=device, dtype=torch.bfloat16).requires_grad_()
    margin = torch.full((32,), 0.2, device=device)

    loss = max_margin(image, text, margin)
    loss.backward()

    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert bool(torch.isfinite(image.grad.float()).all())
    assert bool(torch.isfinite(text.grad.float()).all())


def test_max_margin_accepts_zero_margin() -> None:
    image, text = make_pair(5)

    loss = max_margin(image, text, torch.zeros(5))

    assert loss.item() == pytest.approx(
        max_margin_pairs_reference(image, text, torch.zeros(5)).item(), rel=1e-6
    )


def test_max_margin_rejects_single_pair() -> None:
    image, text = make_pair(1)

    with pytest.raises(ValueError, match=r"at least 2 pairs, got shape \(1, 16\)"):
        max_margin(image, text, 0.1)


def test_max_margin_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"got \(3, 4\) and \(3, 5\)"):
        max_margin(torch.randn(3, 4), torch.randn(3, 5), 0.1)


def test_max_margin_rejects_negative_margin() -> None:
    image, text = make_pair(3)

    with pytest.raises(ValueError, match=r"margin must be finite and >= 0, got -0.1"):
        max_margin(image, text, -0.1)
    with pytest.raises(ValueError, match=r"every margin must be finite and >= 0, got \[-0.5\]"):
        max_margin(image, text, torch.tensor([0.1, -0.5, 0.2]))


def test_max_margin_rejects_margin_of_wrong_shape() -> None:
    image, text = make_pair(3)

    with pytest.raises(ValueError, match=r"margin must be a scalar or have shape \(3,\)"):
        max_margin(image, text, torch.full((3, 1), 0.1))


def test_info_nce_zero_dim_tau_receives_gradient() -> None:
    image, text = make_pair(8)
    tau = torch.tensor(0.1, requires_grad=True)
    reference_tau = torch.full((8,), 0.1, requires_grad=True)

    info_nce(image, text, tau).backward()
    per_sample_info_nce_reference(image, text, reference_tau).backward()

    assert tau.grad is not None
    assert tau.grad.item() == pytest.approx(reference_tau.grad.sum().item(), rel=1e-5)


def test_max_margin_zero_dim_margin_receives_gradient() -> None:
    image, text = make_pair(8)
    margin = torch.tensor(0.3, requires_grad=True)
    reference_margin = torch.full((8,), 0.3, requires_grad=True)

    max_margin(image, text, margin).backward()
    max_margin_index_reference(image, text, reference_margin).backward()

    assert margin.grad is not None
    assert margin.grad.item() == pytest.approx(reference_margin.grad.sum().item(), rel=1e-5)


def test_info_nce_backward_twice_with_retain_graph() -> None:
    image, text = make_pair(6)
    image.requires_grad_()
    tau = torch.linspace(0.05, 0.1, 6)

    loss = info_nce(image, text, tau)
    loss.backward(retain_graph=True)
    first = image.grad.clone()
    loss.backward()

    torch.testing.assert_close(image.grad, 2 * first)
