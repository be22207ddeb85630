"""Contrastive losses with a per-anchor temperature or margin.

Both losses take a batch of ``(B, D)`` image (or video) embeddings and ``(B, D)`` text
embeddings, L2-normalized, where row ``i`` of each is a matching pair. They run on CPU
and CUDA, in float32 and bfloat16: the similarity matmul runs in the input dtype, and
everything after it in float32.

NOTE: the CUDA paths are covered by tests that skip without a GPU, and they have not
been run yet. Run tests/test_losses.py on a GPU machine before a long CUDA training run.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F

__all__ = ["info_nce", "max_margin"]


def info_nce(
    image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float | torch.Tensor
) -> torch.Tensor:
    """Compute the symmetric InfoNCE (CLIP) loss with one temperature per anchor.

    With similarities ``s = image_emb @ text_emb.T``, row ``i`` of the image-to-text
    logits is ``s[i, :] / tau[i]`` and row ``i`` of the text-to-image logits is
    ``s[:, i] / tau[i]``. The loss is the mean of the two cross-entropies with the
    matching pair (the diagonal) as target. With a scalar ``tau`` this is the CLIP loss
    with logit scale ``1 / tau``, computed with ``F.cross_entropy``. The softmax runs in
    float32 with the maximum subtracted, so temperatures down to 0.005 (logits up to
    200) stay finite.

    Args:
        image_emb: ``(B, D)`` L2-normalized image embeddings, float32 or bfloat16.
        text_emb: ``(B, D)`` L2-normalized text embeddings, same shape.
        tau: temperature, > 0. A Python number, a 0-d tensor or a ``(B,)`` tensor with
            one temperature per pair. Gradients flow to a tensor that requires them.

    Returns:
        The scalar float32 loss.

    Raises:
        ValueError: if the shapes do not match or a temperature is not positive.
    """
    _check_embeddings(image_emb, text_emb, min_batch=1)
    batch_size = image_emb.shape[0]
    similarity = (image_emb @ text_emb.T).float()

    if _is_per_anchor(tau):
        taus = _per_anchor_values("tau", tau, batch_size, allow_zero=False)
        return _PerAnchorInfoNce.apply(similarity, taus.to(similarity.device).reciprocal())

    logits_per_image = similarity / _scalar_value("tau", tau, allow_zero=False)
    targets = torch.arange(batch_size, device=similarity.device)
    image_loss = F.cross_entropy(logits_per_image, targets)
    text_loss = F.cross_entropy(logits_per_image.T, targets)
    return 0.5 * (image_loss + text_loss)


class _PerAnchorInfoNce(torch.autograd.Function):
    """Symmetric InfoNCE of a ``(B, B)`` similarity matrix with per-anchor inverse temperatures.

    This fuses what two ``F.cross_entropy`` calls on separately scaled logits would do,
    with fewer passes over the ``(B, B)`` matrix than autograd makes, so that the
    per-anchor loss costs about as much as the CLIP loss with a scalar temperature.
    ``benchmarks/bench_losses.py`` measures the ratio.

    The image-to-text logits are ``L1 = s * inv[:, None]`` (softmax over rows) and the
    transposed text-to-image logits are ``L2 = s * inv[None, :]`` (softmax over columns).
    With ``P1, P2`` their softmax probabilities and ``f = 1 / (2B)``:

    - ``loss = f * (sum_i logsumexp(L1[i, :]) + sum_j logsumexp(L2[:, j]) - 2 sum_i L1[i, i])``
    - ``d loss / d s = f * (P1 * inv[:, None] + P2 * inv[None, :] - 2 diag(inv))``
    - ``d loss / d inv_i = f * (sum_j P1[i, j] s[i, j] + sum_j P2[j, i] s[j, i] - 2 s[i, i])``
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        similarity: torch.Tensor,
        inverse_tau: torch.Tensor,
    ) -> torch.Tensor:
        batch_size = similarity.shape[0]

        # Log-probabilities, in place on buffers that belong to this function.
        log_p_image = similarity * inverse_tau.unsqueeze(1)
        log_p_image.sub_(torch.logsumexp(log_p_image, dim=1, keepdim=True))
        log_p_text = similarity * inverse_tau.unsqueeze(0)
        log_p_text.sub_(torch.logsumexp(log_p_text, dim=0, keepdim=True))

        loss = -(log_p_image.diagonal().sum() + log_p_text.diagonal().sum()) / (2 * batch_size)
        keep_similarity = similarity if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(log_p_image, log_p_text, inverse_tau, keep_similarity)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        log_p_image, log_p_text, inverse_tau, similarity = ctx.saved_tensors
        batch_size = log_p_image.shape[0]
        factor = grad_output / (2 * batch_size)

        # New tensors, so that a second backward with retain_graph=True still works.
        p_image = torch.exp(log_p_image)
        p_text = torch.exp(log_p_text)

        grad_inverse_tau = None
        if ctx.needs_input_grad[1]:
            row_dots = torch.einsum("ij,ij->i", p_image, similarity)
            column_dots = torch.einsum("ij,ij->j", p_text, similarity)
            grad_inverse_tau = (row_dots + column_dots - 2 * similarity.diagonal()) * factor

        grad_similarity = None
        if ctx.needs_input_grad[0]:
            weights = inverse_tau * factor
            grad_similarity = p_image.mul_(weights.unsqueeze(1))
            grad_similarity.addcmul_(p_text, weights.unsqueeze(0))
            grad_similarity.diagonal().sub_(2 * weights)
        return grad_similarity, grad_inverse_tau


def max_margin(
    image_emb: torch.Tensor, text_emb: torch.Tensor, margin: float | torch.Tensor
) -> torch.Tensor:
    """Compute the bidirectional max-margin ranking loss with one margin per anchor.

    With cosine similarities ``s = text_emb @ image_emb.T``, the loss is the mean over all
    ``i != j`` of ``relu(m_i - s_ii + s_ij)`` (text ``i`` against image ``j``) and
    ``relu(m_i - s_ii + s_ji)`` (image ``i`` against text ``j``): ``2 * B * (B - 1)``
    terms. Memory is ``O(B^2)``: two ``(B, B)`` float32 buffers besides the similarities,
    and no list of pair indices. The backward pass is written by hand (see
    `_BidirectionalHinge`), so this loss cannot be differentiated twice.

    Args:
        image_emb: ``(B, D)`` L2-normalized image embeddings, float32 or bfloat16, B >= 2.
        text_emb: ``(B, D)`` L2-normalized text embeddings, same shape.
        margin: margin in cosine-similarity units, >= 0. A Python number, a 0-d tensor
            or a ``(B,)`` tensor with the margin of each anchor pair. Gradients flow to
            a tensor that requires them.

    Returns:
        The scalar float32 loss.

    Raises:
        ValueError: if the shapes do not match, B < 2, or a margin is negative.
    """
    _check_embeddings(image_emb, text_emb, min_batch=2)
    batch_size = image_emb.shape[0]
    similarity = (text_emb @ image_emb.T).float()

    if _is_per_anchor(margin):
        margins = _per_anchor_values("margin", margin, batch_size, allow_zero=True)
        margins = margins.to(similarity.device)
    else:
        value = _scalar_value("margin", margin, allow_zero=True)
        margins = torch.full((batch_size,), value, device=similarity.device)
    return _BidirectionalHinge.apply(similarity, margins)


class _BidirectionalHinge(torch.autograd.Function):
    """Mean bidirectional hinge of a ``(B, B)`` similarity matrix ``s = text @ image.T``.

    The backward pass is written by hand because autograd through broadcast, relu and
    masking makes many more passes over the ``(B, B)`` matrix, and on a CPU those passes
    cost about as much as the matrix products of the embeddings' gradients.

    Let ``P[i, j] = 1`` where the text-side term ``m_i - s_ii + s_ij`` is positive, and
    ``Q[i, j] = 1`` where the image-side term ``m_j - s_jj + s_ij`` is positive, both zero
    on the diagonal. For a fixed pattern the summed loss is linear in ``s`` and ``m``:
    ``sum(G * s) + sum(m * counts)`` with ``G = P + Q`` off the diagonal,
    ``counts = P.sum(1) + Q.sum(0)`` and ``G[i, i] = -counts[i]``. So ``G / n`` and
    ``counts / n``, with ``n = 2 * B * (B - 1)``, are the gradients with respect to ``s``
    and ``m``. A term that is exactly zero gets zero gradient, as with relu.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        similarity: torch.Tensor,
        margins: torch.Tensor,
    ) -> torch.Tensor:
        batch_size = similarity.shape[0]
        threshold = similarity.diagonal() - margins

        # Comparisons write 1.0 / 0.0 straight into float buffers: one pass each.
        gradient = torch.empty_like(similarity)
        torch.gt(similarity, threshold.unsqueeze(1), out=gradient)
        image_side = torch.empty_like(similarity)
        torch.gt(similarity, threshold.unsqueeze(0), out=image_side)
        gradient.diagonal().zero_()
        image_side.diagonal().zero_()

        # Row and column sums as matrix-vector products, which are faster than sum().
        ones = similarity.new_ones(batch_size)
        counts = gradient @ ones + ones @ image_side
        gradient.add_(image_side)
        del image_side
        gradient.diagonal().copy_(-counts)

        total = torch.dot(gradient.reshape(-1), similarity.reshape(-1)) + torch.dot(margins, counts)
        scale = 1.0 / (2 * batch_size * (batch_size - 1))
        ctx.save_for_backward(gradient, counts)
        ctx.scale = scale
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gradient, counts = ctx.saved_tensors
        factor = grad_output * ctx.scale
        grad_similarity = gradient * factor if ctx.needs_input_grad[0] else None
        grad_margins = counts * factor if ctx.needs_input_grad[1] else None
        return grad_similarity, grad_margins


def _check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, *, min_batch: int) -> None:
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
        if not emb.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {emb.dtype}")

    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            "image_emb and text_emb must both have shape (B, D), got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if image_emb.shape[0] < min_batch:
        raise ValueError(
            f"the batch must contain at least {min_batch} pairs, got shape {tuple(image_emb.shape)}"
        )


def _is_per_anchor(value: float | torch.Tensor) -> TypeGuard[torch.Tensor]:
    """Return whether ``value`` takes the tensor path: a (B,) tensor or one that needs grad."""
    return isinstance(value, torch.Tensor) and (value.dim() > 0 or value.requires_grad)


def _per_anchor_values(
    name: str, values: torch.Tensor, batch_size: int, *, allow_zero: bool
) -> torch.Tensor:
    """Return ``values`` as a float32 ``(B,)`` tensor after checking shape and sign.

    A 0-d tensor is expanded to ``(B,)``. The sign check reads one boolean back from
    the device, which synchronizes CUDA.
    """
    if values.dim() == 0:
        values = values.expand(batch_size)
    if values.shape != (batch_size,):
        raise ValueError(
            f"{name} must be a scalar or have shape ({batch_size},) to match the batch, "
            f"got {tuple(values.shape)}"
        )

    values = values.float()
    # One reduction and one read-back: NaN propagates into the min and max.
    low, high = torch.aminmax(values.detach())
    low_value, high_value = float(low), float(high)
    if not ((low_value >= 0 if allow_zero else low_value > 0) and high_value < math.inf):
        valid = torch.isfinite(values) & (values >= 0 if allow_zero else values > 0)
        bound = ">= 0" if allow_zero else "> 0"
        bad = values[~valid][:5].tolist()
        raise ValueError(f"every {name} must be finite and {bound}, got {bad}")
    return values


def _scalar_value(name: str, value: float | torch.Tensor, *, allow_zero: bool) -> float:
    number = float(value)
    valid = number >= 0 if allow_zero else number > 0
    if not valid or number == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {number}")
    return number
