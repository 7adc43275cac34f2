"""routed_swiglu_mlp and routed_qkv_projection against naive float64 per-expert references written here."""
import pytest
import torch
import torch.nn.functional as F

from mmfuse.kernels.routed_linear import build_routing
from mmfuse.kernels.routed_mlp import routed_qkv_projection, routed_swiglu_mlp
from tests.helpers import rel_err, triton_devices

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def param(shape, dtype, device, trainable):
    return torch.nn.Parameter((torch.randn(shape) / shape[-1] ** 0.5).to(dtype).to(device), requires_grad=trainable)


def leaf64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def ref_grad(t64):
    return t64.grad if t64.grad is not None else torch.zeros_like(t64)


def naive_swiglu(x, modality, gates, ups, downs):
    """float64, one separate gate / up / down Linear per expert, each token taken from its expert's output."""
    out = x.new_zeros(x.shape)
    for e, (g, u, d) in enumerate(zip(gates, ups, downs)):
        y_e = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        out = torch.where((modality == e)[..., None], y_e, out)
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts", [2, 3])
def test_swiglu_mlp_forward_and_gradients(backend, device, dtype, num_experts):
    d, inter = 48, 40
    x = torch.randn(2, 17, d).to(dtype).to(device).requires_grad_()
    modality = torch.randint(0, num_experts, (2, 17), device=device)
    gates = [param((inter, d), dtype, device, e != 0) for e in range(num_experts)]
    ups = [param((inter, d), dtype, device, e != 0) for e in range(num_experts)]
    downs = [param((d, inter), dtype, device, e != 0) for e in range(num_experts)]
    gate_up = [torch.nn.Parameter(torch.cat([g, u]).detach(), requires_grad=e != 0)
               for e, (g, u) in enumerate(zip(gates, ups))]

    y = routed_swiglu_mlp(x, modality, gate_up, downs, backend=backend)
    x64 = leaf64(x)
    g64, u64, d64 = ([leaf64(t) for t in ts] for ts in (gates, ups, downs))
    ref = naive_swiglu(x64, modality, g64, u64, d64)
    tol = TOL[dtype]
    assert y.shape == x.shape and y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, ref) <= tol

    grad = torch.randn_like(ref)
    y.backward(grad.to(dtype))
    ref.backward(grad)
    assert rel_err(x.grad, x64.grad) <= tol
    for e in range(num_experts):
        if e == 0:
            assert gate_up[0].grad is None and downs[0].grad is None
            continue
        expected_gate_up = torch.cat([ref_grad(g64[e]), ref_grad(u64[e])])
        assert rel_err(gate_up[e].grad, expected_gate_up) <= tol
        assert rel_err(downs[e].grad, ref_grad(d64[e])) <= tol


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_projection_forward_and_gradients(backend, device, with_bias):
    d, hq, hkv, dh = 48, 4, 2, 8
    rows = (hq + 2 * hkv) * dh
    x = torch.randn(3, 11, d, device=device, requires_grad=True)
    modality = torch.randint(0, 2, (3, 11), device=device)
    weights = [param((rows, d), torch.float32, device, e == 1) for e in range(2)]
    biases = [param((rows,), torch.float32, device, e == 1) for e in range(2)] if with_bias else None

    q, k, v = routed_qkv_projection(x, modality, weights, biases, num_heads=hq, num_kv_heads=hkv, backend=backend)
    assert q.shape == (3, 11, hq, dh) and k.shape == (3, 11, hkv, dh) and v.shape == (3, 11, hkv, dh)

    x64, w64 = leaf64(x), [leaf64(w) for w in weights]
    b64 = [leaf64(b) for b in biases] if with_bias else [None, None]
    refs = []
    for start, heads in ((0, hq), (hq, hkv), (hq + hkv, hkv)):
        sl = slice(start * dh, (start + heads) * dh)
        per_expert = [F.linear(x64, w[sl], None if b is None else b[sl]) for w, b in zip(w64, b64)]
        refs.append(torch.where((modality == 1)[..., None], per_expert[1], per_expert[0]).view(3, 11, heads, dh))
    grads = [torch.randn_like(r) for r in refs]
    for out, ref in zip((q, k, v), refs):
        assert rel_err(out, ref) <= 1e-4
    torch.autograd.backward([q, k, v], [g.float() for g in grads])
    torch.autograd.backward(refs, grads)
    assert rel_err(x.grad, x64.grad) <= 1e-4
    assert rel_err(weights[1].grad, w64[1].grad) <= 1e-4 and weights[0].grad is None
    if with_bias:
        assert rel_err(biases[1].grad, b64[1].grad) <= 1e-4 and biases[0].grad is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_routing_shared_by_attention_and_mlp(backend, device):
    d, inter = 32, 24
    x = torch.randn(2, 9, d, device=device)
    modality = torch.randint(0, 2, (2, 9), device=device)
    routing = build_routing(modality, 2, backend=backend)
    qkv_w = [param((3 * d, d), torch.float32, device, False) for _ in range(2)]
    gate_up = [param((2 * inter, d), torch.float32, device, False) for _ in range(2)]
    down = [param((d, inter), torch.float32, device, False) for _ in range(2)]
    q, k, v = routed_qkv_projection(x, modality, qkv_w, num_heads=2, num_kv_heads=2, routing=routing, backend=backend)
    y = routed_swiglu_mlp(q.reshape(2, 9, d), modality, gate_up, down, routing=routing, backend=backend)

    x64 = x.double()
    q_ref = torch.where((modality == 1)[..., None], x64 @ qkv_w[1][:d].double().T, x64 @ qkv_w[0][:d].double().T)
    gates = [w[:inter].double() for w in gate_up]
    ups = [w[inter:].double() for w in gate_up]
    ref = naive_swiglu(q_ref, modality, gates, ups, [w.double() for w in down])
    assert rel_err(q.reshape(2, 9, d), q_ref) <= 1e-4
    assert rel_err(y, ref) <= 1e-4


def _mlp_args():
    x = torch.randn(6, 16)
    modality = torch.randint(0, 2, (6,))
    return x, modality, [torch.randn(20, 16) for _ in range(2)], [torch.randn(16, 10) for _ in range(2)]


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(gate_up_weights=[torch.randn(21, 16) for _ in range(2)]), ValueError, "gate_up_weights"),
    (lambda a: a.update(gate_up_weights=[torch.randn(20, 15) for _ in range(2)]), ValueError, "gate_up_weights"),
    (lambda a: a.update(down_weights=[torch.randn(16, 11) for _ in range(2)]), ValueError, "down_weights"),
    (lambda a: a.update(down_weights=[torch.randn(16, 10)]), ValueError, "down_weights must hold 2"),
    (lambda a: a.update(down_weights=[torch.randn(16, 10), torch.randn(16, 10).double()]), TypeError,
     r"down_weights\[1\]"),
    (lambda a: a.update(modality=torch.zeros(5, dtype=torch.int64)), ValueError, "modality"),
])
def test_swiglu_mlp_bad_input(change, error, match):
    x, modality, gate_up, down = _mlp_args()
    args = dict(x=x, modality=modality, gate_up_weights=gate_up, down_weights=down)
    change(args)
    with pytest.raises(error, match=match):
        routed_swiglu_mlp(**args)


def test_qkv_projection_bad_input():
    x, modality = torch.randn(6, 16), torch.randint(0, 2, (6,))
    weights = [torch.randn(40, 16) for _ in range(2)]
    with pytest.raises(ValueError, match="qkv_weights"):
        routed_qkv_projection(x, modality, weights, num_heads=5, num_kv_heads=1)  # 40 rows, 7 heads
    with pytest.raises(ValueError, match="num_heads"):
        routed_qkv_projection(x, modality, weights, num_heads=0, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"qkv_biases\[e\]"):
        routed_qkv_projection(x, modality, weights, [torch.randn(39) for _ in range(2)], num_heads=3,
                              num_kv_heads=1)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gate_up_epilogue_without_grad_keeps_no_preactivations(backend, device):
    from mmfuse.kernels.routed_mlp import _gate_up_swiglu_op

    x = torch.randn(37, 48, device=device)
    modality = torch.randint(0, 2, (37,), device=device)
    weights = [torch.randn(2 * 40, 48, device=device) / 7 for _ in range(2)]
    routing = build_routing(modality, 2, backend=backend)
    hidden, pre = _gate_up_swiglu_op(x, routing.order, routing.inverse, routing.offsets, routing.tiles,
                                     routing.host_offsets, weights, False, backend)
    assert pre.numel() == 0
    x64, w64 = x.double(), [w.double() for w in weights]
    want = torch.empty(37, 40, dtype=torch.float64, device=device)
    for e in range(2):
        rows = modality == e
        g, u = (x64[rows] @ w64[e].T).chunk(2, dim=-1)
        want[rows] = F.silu(g) * u
    assert rel_err(hidden, want[routing.order]) <= 1e-4  # rows in routing order


def test_gate_up_op_registrations_are_consistent():
    from mmfuse.kernels.routed_mlp import _gate_up_swiglu_op

    x = torch.randn(9, 16, requires_grad=True)
    modality = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    weights = [torch.randn(24, 16, requires_grad=e == 1) for e in range(2)]
    routing = build_routing(modality, 2, backend="torch")
    args = (x, routing.order, routing.inverse, routing.offsets, routing.tiles, routing.host_offsets, weights, True,
            "torch")
    torch.library.opcheck(_gate_up_swiglu_op, args, test_utils=("test_schema", "test_faketensor",
                                                                 "test_autograd_registration"))
