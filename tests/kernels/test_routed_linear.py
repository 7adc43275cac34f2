"""routed_linear and build_routing against naive float64 references written here."""
import importlib

import pytest
import torch

from mmfuse.kernels.routed_linear import MAX_TRITON_EXPERTS, Routing, build_routing, routed_linear
from tests.helpers import rel_err, triton_devices

# The module itself (the package re-exports the function under the same name).
routed_linear_module = importlib.import_module("mmfuse.kernels.routed_linear")
BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def naive_routed_linear(x, modality, weights, biases=None):
    """float64, token by token: y[i] = x[i] @ W[m[i]].T + b[m[i]]."""
    x2d = x.reshape(-1, x.shape[-1]).double()
    ids = modality.reshape(-1).tolist()
    rows = []
    for i, e in enumerate(ids):
        y = x2d[i] @ weights[e].double().T
        if biases is not None:
            y = y + biases[e].double()
        rows.append(y)
    out = torch.stack(rows) if rows else x2d.new_zeros((0, weights[0].shape[0]))
    return out.reshape(*x.shape[:-1], weights[0].shape[0])


def make_experts(num_experts, d_out, d_in, dtype, device, frozen=(0,), bias=True):
    weights, biases = [], []
    for e in range(num_experts):
        trainable = e not in frozen
        weights.append(torch.nn.Parameter((torch.randn(d_out, d_in) / d_in**0.5).to(dtype).to(device),
                                          requires_grad=trainable))
        biases.append(torch.nn.Parameter(torch.randn(d_out).to(dtype).to(device), requires_grad=trainable))
    return weights, (biases if bias else None)


def leaf64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def ref_grad(t64):
    """The reference gradient; a parameter no token reached has none in autograd, i.e. zero."""
    return t64.grad if t64.grad is not None else torch.zeros_like(t64)


def check_against_naive(x, modality, weights, biases, backend, routing=None):
    """Forward and every gradient of routed_linear vs autograd through the naive float64 reference."""
    tol = TOL[x.dtype]
    y = routed_linear(x, modality, weights, biases, routing=routing, backend=backend)
    x64, w64 = leaf64(x), [leaf64(w) for w in weights]
    b64 = [leaf64(b) for b in biases] if biases is not None else None
    ref = naive_routed_linear(x64, modality, w64, b64)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any()
    assert rel_err(y, ref) <= tol

    grad = torch.randn_like(ref)
    y.backward(grad.to(y.dtype))
    ref.backward(grad)
    if x.requires_grad:
        assert rel_err(x.grad, x64.grad) <= tol
    for e, (w, w_ref) in enumerate(zip(weights, w64)):
        if w.requires_grad:
            assert w.grad is not None and w.grad.dtype == w.dtype and not torch.isnan(w.grad).any()
            assert rel_err(w.grad, ref_grad(w_ref)) <= tol, f"dW of expert {e}"
        else:
            assert w.grad is None, f"frozen expert {e} got a weight gradient"
    for e, (b, b_ref) in enumerate(zip(biases or [], b64 or [])):
        if b.requires_grad:
            assert rel_err(b.grad, ref_grad(b_ref)) <= tol, f"dbias of expert {e}"
        else:
            assert b.grad is None
    return y


# ----------------------------------------------------------------------------------------------
# Routing metadata
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [2, 3])
def test_build_routing_sorts_stably_and_tiles_cover_every_row(num_experts):
    modality = torch.randint(0, num_experts, (3, 37))
    modality[modality == num_experts - 1] = 0  # the last expert's group is empty
    r = build_routing(modality, num_experts)
    ids = modality.reshape(-1)
    expected_order = [i for e in range(num_experts) for i in range(ids.numel()) if ids[i] == e]
    assert r.order.tolist() == expected_order
    counts = [int((ids == e).sum()) for e in range(num_experts)]
    assert r.offsets.tolist() == [sum(counts[:e]) for e in range(num_experts + 1)]
    assert r.host_offsets.device.type == "cpu" and r.host_offsets.tolist() == r.offsets.tolist()

    block_m = routed_linear_module.routing_block_m()
    covered = torch.zeros(ids.numel(), dtype=torch.int64)
    for expert, start, end in r.tiles.tolist():
        if expert < 0:
            continue
        assert r.offsets[expert] <= start < end == r.offsets[expert + 1]
        covered[start:min(start + block_m, end)] += 1
    assert covered.tolist() == [1] * ids.numel()  # every sorted row in exactly one tile


def test_build_routing_rejects_bad_ids():
    with pytest.raises(ValueError, match="modality values"):
        build_routing(torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="modality values"):
        build_routing(torch.tensor([0, -1]), 2)
    with pytest.raises(TypeError, match="modality"):
        build_routing(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="num_experts"):
        build_routing(torch.tensor([0, 1]), 0)


# ----------------------------------------------------------------------------------------------
# Forward and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,d_in,d_out", [(2, 48, 80), (3, 64, 33)])
def test_forward_and_gradients(backend, device, dtype, num_experts, d_in, d_out):
    x = torch.randn(3, 15, d_in).to(dtype).to(device).requires_grad_()
    modality = torch.randint(0, num_experts, (3, 15), device=device)
    weights, biases = make_experts(num_experts, d_out, d_in, dtype, device, frozen=(0,))
    check_against_naive(x, modality, weights, biases, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_bias_all_trainable_fp16(backend, device):
    x = torch.randn(29, 48).half().to(device).requires_grad_()
    modality = torch.randint(0, 2, (29,), device=device)
    weights, _ = make_experts(2, 80, 48, torch.float16, device, frozen=(), bias=False)
    check_against_naive(x, modality, weights, None, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_expert_group_gets_zero_gradients(backend, device):
    x = torch.randn(21, 48, device=device, requires_grad=True)
    modality = torch.zeros(21, dtype=torch.int64, device=device)  # expert 1 sees no token
    weights, biases = make_experts(2, 33, 48, torch.float32, device, frozen=())
    check_against_naive(x, modality, weights, biases, backend)
    assert weights[1].grad.abs().max() == 0 and biases[1].grad.abs().max() == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_single_token(backend, device):
    x = torch.randn(1, 48, device=device, requires_grad=True)
    modality = torch.tensor([1], device=device)
    weights, biases = make_experts(3, 80, 48, torch.float32, device, frozen=(0,))
    check_against_naive(x, modality, weights, biases, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_input(backend, device):
    base = torch.randn(64, 2, 30, device=device)
    x = base.transpose(0, 2)[:, 1].requires_grad_()  # (30, 64), strides (1, 60)
    assert not x.is_contiguous()
    modality = torch.randint(0, 2, (30,), device=device)
    weights, biases = make_experts(2, 33, 64, torch.float32, device, frozen=(1,))
    check_against_naive(x, modality, weights, biases, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_routing_reused_across_two_layers(backend, device):
    modality = torch.randint(0, 2, (2, 23), device=device)
    routing = build_routing(modality, 2, backend=backend)
    x = torch.randn(2, 23, 48, device=device, requires_grad=True)
    w1, b1 = make_experts(2, 80, 48, torch.float32, device)
    w2, b2 = make_experts(2, 33, 80, torch.float32, device)
    h = routed_linear(x, modality, w1, b1, routing=routing, backend=backend)
    y = routed_linear(torch.relu(h), modality, w2, b2, routing=routing, backend=backend)

    x64 = leaf64(x)
    w1_64, b1_64, w2_64, b2_64 = ([leaf64(t) for t in ts] for ts in (w1, b1, w2, b2))
    ref = naive_routed_linear(torch.relu(naive_routed_linear(x64, modality, w1_64, b1_64)), modality, w2_64, b2_64)
    assert rel_err(y, ref) <= 1e-4
    grad = torch.randn_like(ref)
    y.backward(grad.float())
    ref.backward(grad)
    assert rel_err(x.grad, x64.grad) <= 1e-4
    assert rel_err(w1[1].grad, w1_64[1].grad) <= 1e-4 and rel_err(w2[1].grad, w2_64[1].grad) <= 1e-4
    assert w1[0].grad is None and w2[0].grad is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_frozen_experts_do_no_weight_gradient_work(backend, device, monkeypatch):
    """Only trainable experts reach the dW code; with x frozen too, nothing else runs."""
    calls = []
    name = "_expert_grads_triton" if backend == "triton" else "_expert_grads_torch"
    original = getattr(routed_linear_module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs["expert"])
        return original(*args, **kwargs)

    monkeypatch.setattr(routed_linear_module, name, spy)
    x = torch.randn(25, 48, device=device)
    modality = torch.randint(0, 3, (25,), device=device)
    weights, biases = make_experts(3, 33, 48, torch.float32, device, frozen=(0, 2))
    check_against_naive(x, modality, weights, biases, backend)
    assert calls == [1]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_poisoned_outputs_are_fully_written(backend, device):
    """With deterministic mode on, torch.empty fills with NaN: any row the kernels miss shows up."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(2, 19, 48, device=device, requires_grad=True)
        modality = torch.randint(0, 3, (2, 19), device=device)
        weights, biases = make_experts(3, 80, 48, torch.float32, device, frozen=(2,))
        y = check_against_naive(x, modality, weights, biases, backend)
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(w.grad).all() for w in weights[:2])
    finally:
        torch.use_deterministic_algorithms(previous)


def test_torch_compile_fullgraph_forward_backward():
    class TwoRoutedLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.ParameterList(make_experts(2, 40, 48, torch.float32, "cpu", bias=False)[0])
            self.w2 = torch.nn.ParameterList(make_experts(2, 48, 40, torch.float32, "cpu", bias=False)[0])

        def forward(self, x, modality):
            routing = build_routing(modality, 2, backend="torch")
            h = routed_linear(x, modality, list(self.w1), routing=routing, backend="torch")
            return routed_linear(torch.tanh(h), modality, list(self.w2), routing=routing, backend="torch")

    torch._dynamo.reset()
    model = TwoRoutedLayers()
    x = torch.randn(2, 9, 48, requires_grad=True)
    modality = torch.randint(0, 2, (2, 9))
    y = torch.compile(model, fullgraph=True)(x, modality)

    x64 = leaf64(x)
    w1, w2 = [leaf64(w) for w in model.w1], [leaf64(w) for w in model.w2]
    ref = naive_routed_linear(torch.tanh(naive_routed_linear(x64, modality, w1)), modality, w2)
    assert rel_err(y, ref) <= 1e-4
    y.sum().backward()
    ref.sum().backward()
    assert rel_err(x.grad, x64.grad) <= 1e-4
    assert rel_err(model.w2[1].grad, w2[1].grad) <= 1e-4
    assert model.w1[0].grad is None and model.w2[0].grad is None


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _good_args():
    x = torch.randn(2, 5, 16)
    modality = torch.randint(0, 2, (2, 5))
    weights = [torch.randn(8, 16), torch.randn(8, 16)]
    biases = [torch.randn(8), torch.randn(8)]
    return x, modality, weights, biases


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(modality=torch.tensor([[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]])), ValueError, "modality values"),
    (lambda a: a.update(modality=torch.zeros(10, dtype=torch.int64)), ValueError, "modality must have shape"),
    (lambda a: a.update(modality=torch.zeros(2, 5)), TypeError, "modality must have dtype"),
    (lambda a: a.update(weights=[torch.randn(8, 16), torch.randn(9, 16)]), ValueError, r"weights\[1\]"),
    (lambda a: a.update(weights=[torch.randn(8, 15), torch.randn(8, 15)]), ValueError, r"weights\[e\]"),
    (lambda a: a.update(weights=[torch.randn(8, 16), torch.randn(8, 16).double()]), TypeError, r"weights\[1\]"),
    (lambda a: a.update(weights=[torch.randn(8, 16)]), ValueError, "at least 2"),
    (lambda a: a.update(weights=torch.randn(8, 16)), TypeError, "weights must be a list"),  # not (E, Dout, Din)
    (lambda a: a.update(weights=[torch.randn(8, 16), torch.randn(8, 16, device="meta")]), ValueError, r"weights\[1\]"),
    (lambda a: a.update(biases=[torch.randn(8)]), ValueError, "biases must hold 2"),
    (lambda a: a.update(biases=[torch.randn(7), torch.randn(7)]), ValueError, r"biases\[e\]"),
    (lambda a: a.update(biases=[torch.randn(8), torch.randn(8).half()]), TypeError, r"biases\[1\]"),
    (lambda a: a.update(x=torch.randint(0, 3, (2, 5, 16))), TypeError, "x must have dtype"),
    (lambda a: a.update(routing=build_routing(torch.zeros(7, dtype=torch.int64), 2)), ValueError, "routing was built"),
    (lambda a: a.update(routing=(1, 2)), TypeError, "routing must be a Routing"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
])
def test_bad_input_is_rejected_with_a_named_argument(change, error, match):
    x, modality, weights, biases = _good_args()
    args = dict(x=x, modality=modality, weights=weights, biases=biases)
    change(args)
    with pytest.raises(error, match=match):
        routed_linear(**args)


def test_triton_backend_rejects_too_many_experts():
    if not triton_devices():
        pytest.skip("no Triton device")
    device = triton_devices()[0]
    n = MAX_TRITON_EXPERTS + 1
    x = torch.randn(4, 16, device=device)
    weights = [torch.randn(8, 16, device=device) for _ in range(n)]
    with pytest.raises(ValueError, match="weights holds"):
        routed_linear(x, torch.zeros(4, dtype=torch.int64, device=device), weights, backend="triton")


def test_routing_is_a_dataclass_with_the_documented_fields():
    r = build_routing(torch.tensor([1, 0, 1]), 2)
    assert isinstance(r, Routing) and r.num_experts == 2 and r.num_tokens == 3
    assert r.order.dtype == torch.int64 and r.offsets.dtype == torch.int32 and r.tiles.dtype == torch.int32


def test_a_stacked_weight_tensor_is_taken_as_its_experts():
    x = torch.randn(7, 12, dtype=torch.float64)
    modality = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    stacked = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 5, dtype=torch.float64)
    y = routed_linear(x, modality, stacked, bias, backend="torch")
    want = torch.where(modality[:, None] == 1, x @ stacked[1].T + bias[1], x @ stacked[0].T + bias[0])
    assert rel_err(y, want) <= 1e-12
    y.sum().backward()
    assert stacked.grad.shape == (2, 5, 12) and stacked.grad.abs().sum() > 0
