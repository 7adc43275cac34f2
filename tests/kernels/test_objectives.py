"""Family objectives vs float64 references written out here (CE, MSE and cosine from first principles)."""
import pytest
import torch

from mmfuse.kernels.objectives import (
    Objective,
    lm_loss,
    metamorph_objective,
    metaquery_objective,
    transfusion_objective,
)
from tests.helpers import rel_err, triton_devices

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = 1e-4  # fp32


def ref_ce(hidden, weight, labels, ignore_index=-100):
    """Mean over non-ignored positions of logsumexp(logits) - logit[label], float64."""
    logits = hidden.double() @ weight.double().T
    keep = labels != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return ((lse - picked) * keep).sum() / keep.sum()


def ref_mse(pred, target, mask=None, weights=None):
    """Weighted mean over selected samples of the per-sample MSE, float64."""
    per = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    w = torch.ones_like(per) if weights is None else weights.double()
    m = torch.ones_like(per) if mask is None else mask.double()
    return (per * w * m).sum() / m.sum().clamp_min(1)


def ref_cosine(pred, target, mask):
    p, t = pred.double(), target.double()
    cos = (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))
    return ((1 - cos) * mask).sum() / mask.sum()


def lm_inputs(N=12, H=16, V=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.3
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[[1, 4, 5]] = -100  # image positions carry no LM loss
    return hidden, weight, labels


def grads_match(total, ref_total, leaves, ref_leaves):
    got = torch.autograd.grad(total, leaves)
    want = torch.autograd.grad(ref_total, ref_leaves)
    for g, w in zip(got, want):
        assert not torch.isnan(g).any()
        assert rel_err(g, w) <= TOL, rel_err(g, w)


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors], [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_transfusion_from_hidden(backend, device):
    hidden, weight, labels = lm_inputs()
    pred, target = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    image_mask = torch.tensor([True, False, True])
    (h, w, p), (rh, rw, rp) = leaves(hidden, weight, pred)
    out = transfusion_objective(p.to(device), target.to(device), hidden=h.to(device), lm_weight=w.to(device),
                                labels=labels.to(device), image_mask=image_mask.to(device), backend=backend)
    assert isinstance(out, Objective) and set(out.components) == {"lm", "diffusion"}
    ref_lm, ref_diff = ref_ce(rh, rw, labels), ref_mse(rp, target, image_mask)
    ref_total = ref_lm + 5.0 * ref_diff
    assert rel_err(out.components["lm"], ref_lm) <= TOL
    assert rel_err(out.components["diffusion"], ref_diff) <= TOL
    assert rel_err(out.total, ref_total) <= TOL
    grads_match(out.total, ref_total, (h, w, p), (rh, rw, rp))


def test_transfusion_with_precomputed_ce_and_weights():
    ce = torch.tensor(2.5, requires_grad=True)
    pred, target = torch.randn(4, 30), torch.randn(4, 30)
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    mask = torch.tensor([True, True, False, True])
    out = transfusion_objective(pred, target, ce=ce, image_mask=mask, diffusion_weights=weights,
                                lambda_diffusion=2.0)
    assert rel_err(out.total, 2.5 + 2.0 * ref_mse(pred, target, mask, weights)) <= TOL
    (dce,) = torch.autograd.grad(out.total, ce)
    assert dce.item() == 1.0


def test_no_selected_image_gives_lm_only():
    ce = torch.tensor(1.25)
    pred = torch.randn(2, 10, requires_grad=True)
    out = transfusion_objective(pred, torch.randn(2, 10), ce=ce, image_mask=torch.zeros(2, dtype=torch.bool))
    (dp,) = torch.autograd.grad(out.total, pred)
    assert out.total.item() == 1.25 and out.components["diffusion"].item() == 0.0
    assert torch.equal(dp, torch.zeros_like(dp))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_metamorph(backend, device):
    hidden, weight, labels = lm_inputs(seed=1)
    vision_pred, vision_target = torch.randn(2, 5, 72), torch.randn(2, 5, 72)
    mask = torch.rand(2, 5) < 0.6
    mask[0, 0] = True
    (h, w, vp), (rh, rw, rvp) = leaves(hidden, weight, vision_pred)
    out = metamorph_objective(vp.to(device), vision_target.to(device), hidden=h.to(device), lm_weight=w.to(device),
                              labels=labels.to(device), vision_mask=mask.to(device), backend=backend)
    ref_total = ref_ce(rh, rw, labels) + ref_cosine(rvp, vision_target, mask)
    assert set(out.components) == {"lm", "cosine"}
    assert rel_err(out.components["cosine"], ref_cosine(vision_pred, vision_target, mask)) <= TOL
    assert rel_err(out.total, ref_total) <= TOL
    grads_match(out.total, ref_total, (h, w, vp), (rh, rw, rvp))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_metaquery(backend, device):
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    weights = torch.tensor([1.0, 0.5, 2.0])
    (p,), (rp,) = leaves(pred)
    out = metaquery_objective(p.to(device), target.to(device), diffusion_weights=weights.to(device), backend=backend)
    ref = ref_mse(rp, target, weights=weights)
    assert set(out.components) == {"diffusion"}
    assert rel_err(out.total, ref) <= TOL
    grads_match(out.total, ref, (p,), (rp,))


@pytest.mark.parametrize("call,error,words", [
    (lambda h, w, l: lm_loss(), ValueError, "ce"),
    (lambda h, w, l: lm_loss(torch.tensor(1.0), hidden=h), ValueError, "not both"),
    (lambda h, w, l: lm_loss(torch.ones(3)), ValueError, "0-dim"),
    (lambda h, w, l: lm_loss(hidden=h, labels=l), ValueError, "lm_weight"),
    (lambda h, w, l: metaquery_objective(torch.randn(3, 4), torch.randn(3, 4), image_mask=torch.ones(2).bool()),
     ValueError, "image_mask"),
    (lambda h, w, l: metaquery_objective(torch.randn(3, 4), torch.randn(3, 4), image_mask=torch.ones(3)),
     TypeError, "image_mask"),
    (lambda h, w, l: metaquery_objective(torch.randn(3, 4), torch.randn(3, 4), diffusion_weights=torch.ones(4)),
     ValueError, "diffusion_weights"),
])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call(*lm_inputs())


def test_lm_loss_without_the_fused_op(monkeypatch):
    """With mmfuse.kernels.linear_cross_entropy unavailable, the LM term falls back to full logits."""
    import sys

    monkeypatch.setitem(sys.modules, "mmfuse.kernels.linear_cross_entropy", None)  # import -> ImportError
    hidden, weight, labels = lm_inputs(seed=2)
    (h,), (rh,) = leaves(hidden)
    loss = lm_loss(hidden=h, lm_weight=weight, labels=labels)
    ref = ref_ce(rh, weight, labels)
    assert rel_err(loss, ref) <= TOL
    grads_match(loss, ref, (h,), (rh,))
