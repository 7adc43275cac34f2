"""cosine_loss vs a float64 reference written here, on both backends (Triton through the interpreter on CPU)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from mmfuse.kernels.cosine_loss import cosine_loss
from tests.helpers import rel_err, triton_devices

cosine_mod = importlib.import_module("mmfuse.kernels.cosine_loss")

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
EPS = 1e-8


def reference(pred, target, mask):
    """Mean over selected rows of 1 - <p,t> / (max(|p|, eps) max(|t|, eps)), in float64; 0 if none selected."""
    p, t = pred.double(), target.double()
    cos = (p * t).sum(-1) / (p.norm(dim=-1).clamp_min(EPS) * t.norm(dim=-1).clamp_min(EPS))
    per_row = 1 - cos
    if mask is None:
        return per_row.mean()
    return (per_row * mask).sum() / mask.sum().clamp_min(1)


def run_case(pred, target, mask, backend, device, target_grad=True):
    """Loss and gradients of mmfuse and of the float64 reference for the same (rounded) inputs."""
    pred = pred.to(device).detach().requires_grad_()
    target = target.to(device).detach().requires_grad_(target_grad)
    mask = None if mask is None else mask.to(device)
    loss = cosine_loss(pred, target, mask, backend=backend)
    leaves = (pred, target) if target_grad else (pred,)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_target = ref_leaves[1] if target_grad else target.detach()
    ref = reference(ref_leaves[0], ref_target, None if mask is None else mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    return (loss, *grads), (ref, *ref_grads)


def assert_matches(got, want, dtype):
    for name, g, w in zip(("loss", "dpred", "dtarget"), got, want):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = rel_err(g, w)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"



# (leading shape, D): one row, awkward D (72), MetaMorph's SigLIP width (1152), and D past one
# interpreted tile (5000 > 4096) so the row loop runs twice.
SHAPES = [((1,), 72), ((3, 5), 72), ((13,), 1152), ((2,), 5000)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,D", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(backend, device, dtype, lead, D, masked, poisoned_allocations):
    gen = torch.Generator().manual_seed(D + len(lead))
    pred = torch.randn(*lead, D, generator=gen).to(dtype)
    target = torch.randn(*lead, D, generator=gen).to(dtype)
    mask = (torch.rand(lead, generator=gen) < 0.6) if masked else None
    if masked:
        mask.view(-1)[0] = True  # at least one selected row
    got, want = run_case(pred, target, mask, backend, device)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_value_is_torch_cosine_similarity(backend, device):
    pred, target = torch.randn(9, 72), torch.randn(9, 72)
    pred[2] = 0.0
    pred[4] *= 1e-9  # below eps: F.cosine_similarity clamps each norm separately
    mask = torch.tensor([True, False, True, True, True, False, True, True, False])
    loss = cosine_loss(pred.to(device), target.to(device), mask.to(device), backend=backend)
    want = (1 - F.cosine_similarity(pred.double(), target.double(), dim=-1, eps=EPS))[mask].mean()
    assert rel_err(loss, want) <= 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_norm_rows_give_no_nan(backend, device, dtype):
    pred, target = torch.randn(6, 72).to(dtype), torch.randn(6, 72).to(dtype)
    pred[1] = 0.0
    target[3] = 0.0
    pred[5] = 0.0
    target[5] = 0.0
    got, want = run_case(pred, target, None, backend, device)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_rows_masked_gives_zero_loss_and_grads(backend, device):
    pred = torch.randn(4, 3, 72, device=device, requires_grad=True)
    target = torch.randn(4, 3, 72, device=device, requires_grad=True)
    mask = torch.zeros(4, 3, dtype=torch.bool, device=device)
    loss = cosine_loss(pred, target, mask, backend=backend)
    dp, dt = torch.autograd.grad(loss, (pred, target))
    assert loss.item() == 0.0
    assert torch.equal(dp, torch.zeros_like(dp)) and torch.equal(dt, torch.zeros_like(dt))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_rows(backend, device):
    pred = torch.randn(0, 72, device=device, requires_grad=True)
    loss = cosine_loss(pred, torch.randn(0, 72, device=device), backend=backend)
    (dp,) = torch.autograd.grad(loss, (pred,))
    assert loss.item() == 0.0 and dp.shape == (0, 72)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_rows_are_ignored_even_if_garbage(backend, device):
    pred, target = torch.randn(5, 72), torch.randn(5, 72)
    mask = torch.tensor([True, False, True, True, False])
    clean = cosine_loss(pred[mask].to(device), target[mask].to(device), backend=backend)
    pred[~mask] = 1e30  # would overflow |p|^2 if read
    loss = cosine_loss(pred.to(device), target.to(device), mask.to(device), backend=backend)
    assert rel_err(loss, clean) <= 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    base_p = torch.randn(72, 11)  # transposed view: stride (1, 11)
    base_t = torch.randn(11, 144)  # every other column: stride (144, 2)
    pred, target = base_p.T, base_t[:, ::2]
    mask = torch.rand(11) < 0.7
    mask[0] = True
    got, want = run_case(pred, target, mask, backend, device)
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_target_without_grad(backend, device):
    pred, target = torch.randn(3, 7, 72), torch.randn(3, 7, 72)
    got, want = run_case(pred, target, None, backend, device, target_grad=False)
    assert len(got) == 2
    assert_matches(got, want, torch.float32)


def test_compiles_without_graph_breaks():
    def objective(pred, target, mask):
        return cosine_loss(pred, target, mask, backend="torch") * 2.0

    pred, target = torch.randn(6, 5, 72), torch.randn(6, 5, 72)
    mask = torch.rand(6, 5) < 0.5
    p1 = pred.clone().requires_grad_()
    out = torch.compile(objective, fullgraph=True, backend="aot_eager")(p1, target, mask)
    out.backward()
    p2 = pred.clone().requires_grad_()
    ref = objective(p2, target, mask)
    ref.backward()
    assert rel_err(out, ref) < 1e-6 and rel_err(p1.grad, p2.grad) < 1e-6


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError naming the argument, before any kernel runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_kernels(monkeypatch):
    """Any kernel launch (either backend) fails loudly, so a check that came too late shows up."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the input check")

    for name in ("_cosine_fwd_triton", "_cosine_fwd_torch"):
        monkeypatch.setattr(cosine_mod, name, boom)


def _good():
    return dict(pred=torch.randn(4, 6, 72), target=torch.randn(4, 6, 72), mask=torch.ones(4, 6, dtype=torch.bool))


@pytest.mark.parametrize("change,error,words", [
    (dict(target=torch.randn(4, 6, 71)), ValueError, "target"),
    (dict(target=torch.randn(4, 72)), ValueError, "target"),
    (dict(mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(4, 6)), TypeError, "mask"),
    (dict(pred=torch.randint(0, 3, (4, 6, 72))), TypeError, "pred"),
    (dict(pred=torch.randn(4, 6, 0), target=torch.randn(4, 6, 0)), ValueError, "pred"),
    (dict(target=[1.0]), TypeError, "target"),
    (dict(target=torch.randn(4, 6, 72, device="meta")), ValueError, "target"),
])
def test_bad_input(change, error, words, no_kernels):
    args = {**_good(), **change}
    with pytest.raises(error, match=words):
        cosine_loss(args["pred"], args["target"], args["mask"], backend="torch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["pred", "target"])
@pytest.mark.parametrize("masked_out", [False, True])
def test_non_finite_input_rejected_on_cpu(bad, name, masked_out):
    """The torch backend tests the per-row sums its forward computed: every row counts, selected or not."""
    args = _good()
    args[name][1, 2, 3] = bad
    args["mask"][1, 2] = not masked_out
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        cosine_loss(args["pred"], args["target"], args["mask"], backend="torch")


@pytest.mark.parametrize("device", triton_devices())
def test_non_finite_input_rejected_before_the_triton_kernel(device, no_kernels):
    args = {k: v.to(device) for k, v in _good().items()}
    args["target"][0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN"):
        cosine_loss(args["pred"], args["target"], args["mask"], check_finite=True, backend="triton")


def test_non_finite_check_can_be_turned_off():
    args = _good()
    args["pred"][0, 0, 0] = float("nan")
    loss = cosine_loss(args["pred"], args["target"], args["mask"], check_finite=False, backend="torch")
    assert torch.isnan(loss)  # propagated, not hidden


def test_finite_inputs_with_overflowing_sum_pass():
    pred = torch.full((4, 72), 3e38)  # finite, but its sum is inf: the exact check must let it through
    cosine_loss(pred, torch.randn(4, 72), backend="torch")


def test_fp64_rejected_on_triton():
    if not triton_devices():
        pytest.skip("no Triton device")
    with pytest.raises(TypeError, match="pred"):
        cosine_loss(torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64),
                    backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_across_row_chunks(dtype, monkeypatch):
    monkeypatch.setattr(importlib.import_module("mmfuse.kernels._loss_common"), "CHUNK_ELEMENTS", 200)
    pred, target = torch.randn(37, 72).to(dtype), torch.randn(37, 72).to(dtype)  # 2 rows a chunk, 19 chunks
    mask = torch.rand(37) < 0.5
    mask[3] = True
    got, want = run_case(pred, target, mask, "torch", "cpu")
    assert_matches(got, want, dtype)
