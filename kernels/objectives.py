"""The training objective of each model family, built from the fused losses.

* Transfusion / LlamaFusion: ``lm + lambda * diffusion`` (lambda = 5 in the paper): text tokens get
  next-token cross-entropy, image latents DDPM noise-prediction MSE.
* MetaMorph: ``lm + lambda * cosine`` (lambda = 1): the vision head regresses the next SigLIP
  visual token with a cosine loss.
* MetaQuery: diffusion only (the MLLM is frozen; the connector and the diffusion decoder train).

The LM term is either a cross-entropy the caller already computed (``ce=``) or computed here from
``hidden, lm_weight, labels`` without materialising the logits (``linear_cross_entropy``). Masks pick
the rows / samples each term applies to: the LM term uses ``labels == ignore_index`` as usual.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._common import check_tensor
from .cosine_loss import cosine_loss
from .diffusion_loss import diffusion_loss

TRANSFUSION_LAMBDA = 5.0
METAMORPH_LAMBDA = 1.0


@dataclass
class Objective:
    """``total`` is what to call ``.backward()`` on; ``components`` the unweighted terms (for logging)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def lm_loss(
    ce: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    lm_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor:
    """The LM cross-entropy: ``ce`` as given, or ``CE(hidden @ lm_weight.T, labels)``.

    Args:
        ce: 0-dim precomputed cross-entropy; pass either this or the three tensors below.
        hidden: (N, H) final hidden states (already shifted to line up with ``labels``).
        lm_weight: (V, H) output embedding.
        labels: (N,) int64 targets; ``ignore_index`` marks positions without an LM loss (images).
    """
    given = [t is not None for t in (hidden, lm_weight, labels)]
    if ce is not None:
        if any(given):
            raise ValueError("pass either ce or (hidden, lm_weight, labels), not both")
        if not isinstance(ce, torch.Tensor) or ce.dim() != 0:
            raise ValueError(f"ce must be a 0-dim tensor, got {getattr(ce, 'shape', type(ce).__name__)}")
        return ce
    if not all(given):
        raise ValueError("pass ce, or all of hidden, lm_weight and labels")
    try:
        from .linear_cross_entropy import linear_cross_entropy
    except ImportError:  # the fused op is optional here: fall back to materialised logits
        return torch.nn.functional.cross_entropy(hidden @ lm_weight.T, labels, ignore_index=ignore_index)
    return linear_cross_entropy(hidden, lm_weight, labels, ignore_index=ignore_index, backend=backend)


def _selected_weights(mask: torch.Tensor | None, weights: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Per-sample weights that make ``diffusion_loss`` the weighted mean over the selected samples only.

    ``mean_b (w_b m_b B / count) L_b = sum_b m_b w_b L_b / count``; no host sync (count stays a tensor).
    """
    if weights is not None:
        check_tensor("diffusion_weights", weights, shape=(batch,))
    if mask is None:
        return weights
    check_tensor("image_mask", mask, dtypes=(torch.bool,), shape=(batch,))
    w = mask.float() * (batch / mask.sum().clamp_min(1).float())
    return w if weights is None else w * weights.float()


def transfusion_objective(
    noise_pred: torch.Tensor,
    noise_target: torch.Tensor,
    *,
    ce: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    lm_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    diffusion_weights: torch.Tensor | None = None,
    lambda_diffusion: float = TRANSFUSION_LAMBDA,
    ignore_index: int = -100,
    backend: str | None = None,
) -> Objective:
    """Transfusion's ``lm + lambda_diffusion * diffusion``.

    Args:
        noise_pred, noise_target: (num_images, ...) per-image predictions and targets (noise or v).
        ce / hidden, lm_weight, labels: the LM term, see :func:`lm_loss`.
        image_mask: bool (num_images,) selecting the images that get the diffusion loss (e.g. not
            the clean images a captioning example conditions on); the diffusion term is the mean
            over the selected ones, 0 if none.
        diffusion_weights: (num_images,) extra per-image weights (e.g. min-SNR), or None.
    """
    lm = lm_loss(ce, hidden, lm_weight, labels, ignore_index=ignore_index, backend=backend)
    weights = _selected_weights(image_mask, diffusion_weights, check_tensor("noise_pred", noise_pred).shape[0])
    diff = diffusion_loss(noise_pred, noise_target, weights, backend=backend)
    return Objective(lm + lambda_diffusion * diff, {"lm": lm, "diffusion": diff})


def metamorph_objective(
    vision_pred: torch.Tensor,
    vision_target: torch.Tensor,
    *,
    ce: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    lm_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    vision_mask: torch.Tensor | None = None,
    lambda_cosine: float = METAMORPH_LAMBDA,
    ignore_index: int = -100,
    backend: str | None = None,
) -> Objective:
    """MetaMorph's ``lm + lambda_cosine * cosine``.

    Args:
        vision_pred: (..., D) vision-head outputs at the visual positions.
        vision_target: (..., D) the SigLIP tokens they regress.
        vision_mask: bool (...,) selecting the visual tokens that get the loss (generated images,
            not input images), or None for all.
        ce / hidden, lm_weight, labels: the LM term, see :func:`lm_loss`.
    """
    lm = lm_loss(ce, hidden, lm_weight, labels, ignore_index=ignore_index, backend=backend)
    cos = cosine_loss(vision_pred, vision_target, vision_mask, backend=backend)
    return Objective(lm + lambda_cosine * cos, {"lm": lm, "cosine": cos})


def metaquery_objective(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    image_mask: torch.Tensor | None = None,
    diffusion_weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> Objective:
    """MetaQuery's diffusion-only objective (flow-matching or DDPM target from the decoder).

    Args:
        pred, target: (B, ...) diffusion-decoder predictions and targets.
        image_mask: bool (B,) selecting the samples that count, or None.
        diffusion_weights: (B,) per-sample weights, or None.
    """
    weights = _selected_weights(image_mask, diffusion_weights, check_tensor("pred", pred).shape[0])
    diff = diffusion_loss(pred, target, weights, backend=backend)
    return Objective(diff, {"diffusion": diff})
