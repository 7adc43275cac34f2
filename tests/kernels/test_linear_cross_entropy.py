"""linear_cross_entropy vs F.cross_entropy on float64 logits, both backends (Triton interpreted on CPU)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from mmfuse.bench.common import peak_memory_mib
from mmfuse.kernels.linear_cross_entropy import linear_cross_entropy
from tests.helpers import rel_err, triton_devices

lce_mod = importlib.import_module("mmfuse.kernels.linear_cross_entropy")

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
IGNORE = -100


def reference(hidden, weight, labels, *, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, reduction="mean",
              grad_out=None, want_dh=True, want_dw=True):
    """Loss and (dhidden, dweight) from float64 logits; the z-loss term written out by hand."""
    h = hidden.detach().double().requires_grad_(want_dh)
    w = weight.detach().double().requires_grad_(want_dw)
    logits = (h @ w.T).reshape(-1, w.shape[0])
    y = labels.reshape(-1)
    valid = y != ignore_index
    ce = F.cross_entropy(logits, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    z_term = z_loss * torch.where(valid, torch.logsumexp(logits, dim=-1), 0.0) ** 2
    rows = ce + z_term
    if reduction == "none":
        loss = rows.reshape(labels.shape)
    elif reduction == "sum":
        loss = rows.sum()
    elif valid.any():
        loss = F.cross_entropy(logits, y, ignore_index=ignore_index, label_smoothing=label_smoothing) \
            + z_term.sum() / valid.sum()
    else:
        loss = rows.sum() * 0.0  # the op's documented value for "every row ignored" (eager gives NaN)
    leaves = [t for t in (h, w) if t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, grad_out)
    grads = iter(grads)
    return loss.detach(), next(grads) if want_dh else None, next(grads) if want_dw else None


def run(hidden, weight, labels, backend, device, grad_out=None, **kwargs):
    """Loss, hidden.grad and weight.grad from mmfuse (leaves made here so non-contiguity is kept)."""
    hidden, weight, labels = hidden.to(device), weight.to(device), labels.to(device)
    loss = linear_cross_entropy(hidden, weight, labels, backend=backend, **kwargs)
    leaves = [t for t in (hidden, weight) if t.requires_grad]
    grads = iter(torch.autograd.grad(loss, leaves, None if grad_out is None else grad_out.to(device)))
    dh = next(grads) if hidden.requires_grad else None
    dw = next(grads) if weight.requires_grad else None
    return loss, dh, dw


def assert_close(got, want, dtype):
    for name, g, w in zip(("loss", "dhidden", "dweight"), got, want):
        if w is None:
            assert g is None, f"{name} was computed but not requested"
            continue
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = rel_err(g.cpu(), w)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"


def make_inputs(lead_shape, D, V, dtype, ignore_frac=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead_shape, D, generator=gen).to(dtype)
    weight = (torch.randn(V, D, generator=gen) * D**-0.5 * 3).to(dtype)  # logits of a few units
    labels = torch.randint(0, V, lead_shape, generator=gen)
    labels[torch.rand(lead_shape, generator=gen) < ignore_frac] = IGNORE
    return hidden.requires_grad_(), weight.requires_grad_(), labels



# (N, D, V, chunk_size): V not a power of two, D = 72, several chunks with a ragged last one.
SHAPES = [(37, 72, 1000, 16), (20, 72, 257, None)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V,chunk_size", SHAPES)
def test_matches_reference(backend, device, dtype, N, D, V, chunk_size, poisoned_allocations):
    hidden, weight, labels = make_inputs((N,), D, V, dtype)
    got = run(hidden, weight, labels, backend, device, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32
    assert_close(got, reference(hidden, weight, labels), dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_label_smoothing_and_z_loss(backend, device, label_smoothing, z_loss):
    hidden, weight, labels = make_inputs((29,), 72, 257, torch.float32, seed=1)
    opts = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    got = run(hidden, weight, labels, backend, device, chunk_size=8, **opts)
    assert_close(got, reference(hidden, weight, labels, **opts), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradients(backend, device, reduction):
    hidden, weight, _ = make_inputs((11,), 72, 257, torch.float32)
    labels = torch.full((11,), IGNORE)
    loss = linear_cross_entropy(hidden.to(device), weight.to(device), labels.to(device), backend=backend,
                                label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss.cpu(), torch.zeros_like(loss.cpu()))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_leading_shape_and_non_contiguous_hidden(backend, device):
    base, weight, labels = make_inputs((13, 3), 72, 257, torch.float32, seed=2)
    hidden = base.detach().transpose(0, 1).requires_grad_()  # (B=3, L=13, D), not contiguous
    labels = labels.T
    assert not hidden.is_contiguous()
    got = run(hidden, weight, labels, backend, device, z_loss=1e-3)
    assert_close(got, reference(hidden, weight, labels, z_loss=1e-3), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sum_and_none_reductions(backend, device, reduction):
    hidden, weight, labels = make_inputs((2, 9), 72, 257, torch.float32, seed=3)
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    grad_out = torch.randn(2, 9) if reduction == "none" else None
    got = run(hidden, weight, labels, backend, device, grad_out=grad_out, chunk_size=5, **opts)
    if reduction == "none":
        assert got[0].shape == (2, 9) and torch.all(got[0].cpu()[labels == IGNORE] == 0)
    assert_close(got, reference(hidden, weight, labels, grad_out=grad_out, **opts), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_frozen_weight_computes_no_weight_gradient(backend, device, monkeypatch):
    calls = []
    grad_buffers = lce_mod._grad_buffers

    def recording(hidden, weight, compute_dh, compute_dw):
        calls.append(compute_dw)
        return grad_buffers(hidden, weight, compute_dh, compute_dw)

    monkeypatch.setattr(lce_mod, "_grad_buffers", recording)
    hidden, weight, labels = make_inputs((21,), 72, 257, torch.float32, seed=4)
    weight.requires_grad_(False)
    got = run(hidden, weight, labels, backend, device)
    assert calls and not any(calls), "a dW buffer was made for a frozen weight"
    assert_close(got, reference(hidden, weight, labels, want_dw=False), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_frozen_hidden_gives_weight_gradient_only(backend, device):
    hidden, weight, labels = make_inputs((21,), 72, 257, torch.bfloat16, seed=5)
    hidden.requires_grad_(False)
    got = run(hidden, weight, labels, backend, device, chunk_size=7)
    assert_close(got, reference(hidden, weight, labels, want_dh=False), torch.bfloat16)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_without_grad(backend, device):
    hidden, weight, labels = make_inputs((25,), 72, 1000, torch.float32, seed=6)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.to(device), weight.to(device), labels.to(device), backend=backend,
                                    label_smoothing=0.1, z_loss=1e-3)
    want = reference(hidden, weight, labels, label_smoothing=0.1, z_loss=1e-3)[0]
    assert rel_err(loss.cpu(), want) <= 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scaled_loss_and_second_backward(backend, device):
    """The stored gradients are scaled in place by the incoming gradient, once."""
    hidden, weight, labels = make_inputs((19,), 72, 257, torch.float32, seed=10)
    loss = linear_cross_entropy(hidden.to(device), weight.to(device), labels.to(device), backend=backend)
    (loss * 0.25).backward(retain_graph=True)
    want = reference(hidden, weight, labels, grad_out=torch.tensor(0.25, dtype=torch.float64))
    assert_close((loss.detach() * 0.25, hidden.grad, weight.grad), (want[0] * 0.25, *want[1:]), torch.float32)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_torch_backend_fp64_and_chunk_of_one_row():
    hidden, weight, labels = make_inputs((9,), 24, 50, torch.float64, seed=7)
    got = run(hidden, weight, labels, "torch", "cpu", chunk_size=1, label_smoothing=0.3, z_loss=0.1)
    want = reference(hidden, weight, labels, label_smoothing=0.3, z_loss=0.1)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-12


def test_compiles_without_graph_breaks():
    def step(hidden, weight, labels):
        return linear_cross_entropy(hidden, weight, labels, z_loss=1e-3, backend="torch") * 2.0

    hidden, weight, labels = make_inputs((2, 15), 72, 257, torch.float32, seed=8)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden, weight, labels)
    loss.backward()
    want_loss, want_dh, want_dw = reference(hidden, weight, labels, z_loss=1e-3, grad_out=torch.tensor(2.0, dtype=torch.float64))
    assert rel_err(loss, 2 * want_loss) <= 1e-4
    assert rel_err(hidden.grad, want_dh) <= 1e-4 and rel_err(weight.grad, want_dw) <= 1e-4


def test_cpu_peak_memory_is_a_quarter_of_eager():
    """The CPU acceptance bar: fwd+bwd peak extra memory <= 25% of F.cross_entropy(h @ W.T)."""
    hidden, weight, labels = make_inputs((2048,), 128, 16000, torch.float32, ignore_frac=0.0)

    def eager():
        F.cross_entropy(hidden @ weight.T, labels).backward()

    def fused():
        linear_cross_entropy(hidden, weight, labels, backend="torch", chunk_size=128).backward()

    fused_mib = peak_memory_mib(fused, "cpu")
    hidden.grad = weight.grad = None
    eager_mib = peak_memory_mib(eager, "cpu")
    if fused_mib is None or eager_mib is None:
        pytest.skip("peak resident memory is not measurable here (/proc/self/clear_refs)")
    assert fused_mib <= 0.25 * eager_mib, f"fused {fused_mib:.1f} MiB vs eager {eager_mib:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# Bad input: rejected with the argument's name, before any sweep runs
# ----------------------------------------------------------------------------------------------


def _good():
    return dict(hidden=torch.randn(6, 8), weight=torch.randn(10, 8), labels=torch.tensor([0, 9, IGNORE, 3, 4, 5]))


def _nan_hidden():
    h = torch.randn(6, 8)
    h[2, 3] = float("nan")
    return h


@pytest.fixture
def no_sweep(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a sweep ran before the input was rejected")

    monkeypatch.setattr(lce_mod, "_sweep", fail)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(weight=torch.randn(10, 7)), ValueError, r"weight must have shape \(\*, 8\)"),
        (dict(weight=torch.randn(80)), ValueError, "weight must have 2 dimensions"),
        (dict(weight=torch.randn(10, 8).double()), TypeError, "weight must have dtype"),
        (dict(hidden=torch.randn(8)), ValueError, "hidden must have shape"),
        (dict(hidden=torch.randn(6, 8).int()), TypeError, "hidden must have dtype"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(6\)"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(labels=torch.zeros(6)), TypeError, "labels must have dtype"),
        (dict(labels=torch.tensor([0, 10, 1, 2, 3, 4])), ValueError, r"labels must lie in \[0, V=10\).*got 10"),
        (dict(labels=torch.tensor([0, -1, 1, 2, 3, 4])), ValueError, "labels must lie in.*got -1"),
        (dict(labels=torch.zeros(6, dtype=torch.long, device="meta")), ValueError, "labels is on meta"),
        (dict(hidden=_nan_hidden()), ValueError, "hidden contains NaN"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_rejects_bad_input(change, error, match, no_sweep):
    args = {**_good(), "backend": "torch", **change}
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)


@pytest.mark.skipif(not triton_devices(), reason="needs the Triton interpreter or a GPU")
def test_triton_rejects_fp64_before_launch(no_sweep):
    args = {n: t.to(triton_devices()[0]) for n, t in _good().items()}
    args["hidden"], args["weight"] = args["hidden"].double(), args["weight"].double()
    with pytest.raises(TypeError, match="hidden must have dtype"):
        linear_cross_entropy(**args, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_llama3_vocab(dtype):
    hidden, weight, labels = make_inputs((1000,), 256, 128256, dtype, seed=9)
    got = run(hidden, weight, labels, "triton", "cuda", label_smoothing=0.1, z_loss=1e-4, chunk_size=384)
    assert_close(got, reference(hidden, weight, labels, label_smoothing=0.1, z_loss=1e-4), dtype)
