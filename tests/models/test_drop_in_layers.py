"""The drop-in modules (RMSNorm, LinearCrossEntropy, CosineLoss, DiffusionLoss) vs float64 references."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.models import CosineLoss, DiffusionLoss, LinearCrossEntropy, RMSNorm, RoutedRMSNorm
from tests.helpers import count_calls, rel_err, triton_devices

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "cpu" not in triton_devices(), reason="needs the Triton interpreter"))]
LAUNCHERS = {"rms_norm": ("mmfuse.kernels.rms_norm", "_rms_norm_fwd_triton"),
             "linear_cross_entropy": ("mmfuse.kernels.linear_cross_entropy", "_chunk_triton"),
             "cosine": ("mmfuse.kernels.cosine_loss", "_cosine_fwd_triton"),
             "diffusion": ("mmfuse.kernels.diffusion_loss", "_diffusion_fwd_triton")}


@pytest.fixture
def triton_launches(monkeypatch) -> Counter:
    """Calls of each op's Triton forward launcher: which backend a module really ran."""
    return count_calls(monkeypatch, LAUNCHERS)


def leaf(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def check_against_reference(out, ref_out, inputs, ref_inputs) -> None:
    """Forward and the gradient of every input (for the same random upstream gradient) within 1e-4."""
    assert rel_err(out, ref_out) <= 1e-4
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, upstream)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-4


def as_f64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_matches_float64(backend, triton_launches):
    x = leaf(3, 5, 40)
    norm = RMSNorm(40, eps=1e-5, backend=backend)
    with torch.no_grad():
        norm.weight.normal_()
    x64, w64 = as_f64(x, norm.weight)
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * w64
    check_against_reference(norm(x), ref, [x, norm.weight], [x64, w64])
    assert (triton_launches["rms_norm"] > 0) == (backend == "triton")


def test_rms_norm_shares_the_given_weight_and_is_the_routed_norms_one_expert_case():
    weight = nn.Parameter(torch.randn(24))
    norm = RMSNorm(eps=1e-5, weight=weight)
    assert norm.weight is weight and list(norm.state_dict()) == ["weight"]
    routed = RoutedRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        routed.weights[0].copy_(weight)
    x = torch.randn(4, 24)
    assert torch.equal(norm(x), routed(x))
    assert "eps=1e-05" in repr(norm)


def test_rms_norm_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        RMSNorm()
    with pytest.raises(TypeError, match="weight must be an nn.Parameter"):
        RMSNorm(weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        RMSNorm(8, weight=nn.Parameter(torch.ones(9)))
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        RMSNorm(8, backend="cuda")
    with pytest.raises(ValueError, match="weight"):
        RMSNorm(8)(torch.randn(2, 9))  # x's last dim is not the weight's


# ----------------------------------------------------------------------------------------------
# LinearCrossEntropy
# ----------------------------------------------------------------------------------------------


def ce_reference(h64, w64, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """float64: F.cross_entropy on the materialised logits, plus PaLM's z-loss on the kept rows."""
    logits = h64 @ w64.T
    keep = labels != ignore_index
    rows = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    rows = rows + z_loss * torch.logsumexp(logits, -1).square() * keep
    if reduction == "none":
        return rows
    return rows.sum() / (keep.sum() if reduction == "mean" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_float64(backend, reduction, triton_launches):
    loss_fn = LinearCrossEntropy(32, 50, label_smoothing=0.1, z_loss=1e-3, reduction=reduction, backend=backend)
    hidden = leaf(13, 32)
    labels = torch.randint(0, 50, (13,))
    labels[[0, 5]] = -100
    h64, w64 = as_f64(hidden, loss_fn.weight)
    ref = ce_reference(h64, w64, labels, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    check_against_reference(loss_fn(hidden, labels), ref, [hidden, loss_fn.weight], [h64, w64])
    assert (triton_launches["linear_cross_entropy"] > 0) == (backend == "triton")


def test_linear_cross_entropy_given_or_shared_weight_and_num_items():
    head = nn.Linear(16, 30, bias=False)
    hidden, labels = torch.randn(2, 7, 16), torch.randint(0, 30, (2, 7))
    labels[0, :2] = -100
    held = LinearCrossEntropy(weight=head.weight)
    assert held.weight is head.weight and list(held.state_dict()) == ["weight"]
    given = LinearCrossEntropy()
    assert list(given.state_dict()) == []
    want = F.cross_entropy((hidden @ head.weight.T).reshape(-1, 30).double(), labels.reshape(-1))
    assert rel_err(held(hidden, labels), want) <= 1e-4
    assert rel_err(given(hidden, labels, head.weight), want) <= 1e-4
    # transformers' gradient-accumulation convention: sum over this batch / items over all micro-batches
    total = F.cross_entropy((hidden @ head.weight.T).reshape(-1, 30).double(), labels.reshape(-1), reduction="sum")
    assert rel_err(given(hidden, labels, head.weight, num_items_in_batch=torch.tensor(40)), total / 40) <= 1e-4
    assert rel_err(given(hidden, labels, head.weight, num_items_in_batch=40), total / 40) <= 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head runs in bf16, as F.linear would
        assert rel_err(held(hidden, labels), want) <= 2e-2


def test_linear_cross_entropy_rejects_bad_input():
    hidden, labels = torch.randn(4, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="weight: pass"):
        LinearCrossEntropy(8, 10)(hidden, labels, torch.randn(10, 8))
    with pytest.raises(ValueError, match="weight: pass"):
        LinearCrossEntropy()(hidden, labels)
    with pytest.raises(ValueError, match="in_features and vocab_size"):
        LinearCrossEntropy(8)
    with pytest.raises(ValueError, match=r"weight must have shape \(vocab_size=10, in_features=8\)"):
        LinearCrossEntropy(8, 10, weight=nn.Parameter(torch.randn(8, 10)))
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        LinearCrossEntropy(8, 10, reduction="sum")(hidden, labels, num_items_in_batch=3)
    with pytest.raises(ValueError, match="label_smoothing"):
        LinearCrossEntropy(8, 10, label_smoothing=2.0)(hidden, labels)
    with pytest.raises(ValueError, match="labels"):
        LinearCrossEntropy(8, 10)(hidden, torch.randint(0, 10, (5,)))


# ----------------------------------------------------------------------------------------------
# CosineLoss, DiffusionLoss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_loss_matches_float64(backend, triton_launches):
    pred, target = leaf(3, 6, 48), leaf(3, 6, 48)
    mask = torch.rand(3, 6) < 0.6
    p64, t64 = as_f64(pred, target)
    ref = (1 - F.cosine_similarity(p64, t64, dim=-1))[mask].mean()
    check_against_reference(CosineLoss(backend=backend)(pred, target, mask), ref, [pred, target], [p64, t64])
    assert (triton_launches["cosine"] > 0) == (backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_loss_matches_float64(backend, triton_launches):
    pred, target = leaf(4, 3, 5, 5), leaf(4, 3, 5, 5)
    weights = torch.rand(4)
    p64, t64 = as_f64(pred, target)
    ref = (weights.double() * (p64 - t64).square().mean(dim=(1, 2, 3))).mean()
    check_against_reference(DiffusionLoss(backend=backend)(pred, target, weights), ref, [pred, target], [p64, t64])
    assert (triton_launches["diffusion"] > 0) == (backend == "triton")


def test_losses_reject_bad_input():
    with pytest.raises(ValueError, match="target"):
        CosineLoss()(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(TypeError, match="mask"):
        CosineLoss()(torch.randn(3, 8), torch.randn(3, 8), torch.ones(3))
    with pytest.raises(ValueError, match="eps"):
        CosineLoss(eps=-1.0)
    with pytest.raises(ValueError, match="weights"):
        DiffusionLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        DiffusionLoss(backend="gpu")
