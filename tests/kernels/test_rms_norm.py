"""rms_norm / routed_rms_norm against float64 references and transformers' LlamaRMSNorm."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mmfuse.kernels.rms_norm import rms_norm, routed_rms_norm
from tests.helpers import rel_err, triton_devices

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
EPS = 1e-6



def _reference(x, modality, weights, eps=EPS):
    """Naive float64 RMSNorm with per-row weights (modality None: the single weight)."""
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in weights]
    rms = torch.sqrt((x64 * x64).sum(-1, keepdim=True) / x64.shape[-1] + eps)
    w_rows = w64[0] if modality is None else torch.stack(w64)[modality.long()]
    return x64 / rms * w_rows, x64, w64


def _check_grads(y, ref, x, x64, weights, w64, dtype):
    dy = torch.randn_like(ref)
    y.backward(dy.to(y.dtype))
    ref.backward(dy)
    assert rel_err(x.grad, x64.grad) <= TOL[dtype]
    assert not torch.isnan(x.grad).any()
    for w, w_ref in zip(weights, w64):
        if w.requires_grad:
            assert rel_err(w.grad, w_ref.grad) <= TOL[dtype]
        else:
            assert w.grad is None


def _strided(shape, dtype, device, transpose):
    """A non-contiguous x: a column slice of a wider tensor, or a transposed one."""
    if transpose:
        return torch.randn(shape[1], shape[0], shape[2], dtype=dtype, device=device).transpose(0, 1)
    wide = torch.randn(*shape[:-1], shape[-1] + 7, dtype=dtype, device=device)
    return wide[..., 3:3 + shape[-1]]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (97, 130), (2, 5, 80)])
def test_rms_norm_matches_float64(backend, device, dtype, shape, poisoned_allocations):
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype).requires_grad_()
    w = torch.randn(shape[-1], device=device).to(dtype).requires_grad_()
    y = rms_norm(x, w, EPS, backend=backend)
    ref, x64, w64 = _reference(x, None, [w])
    assert y.shape == x.shape and y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, ref) <= TOL[dtype]
    _check_grads(y, ref, x, x64, [w], w64, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("transpose", [False, True])
def test_rms_norm_non_contiguous(backend, device, transpose, poisoned_allocations):
    x = _strided((3, 6, 80), torch.float32, device, transpose).requires_grad_()
    assert not x.is_contiguous()
    w = torch.randn(80, device=device, requires_grad=True)
    y = rms_norm(x, w, backend=backend)
    ref, x64, w64 = _reference(x, None, [w])
    assert rel_err(y, ref) <= 1e-4
    _check_grads(y, ref, x, x64, [w], w64, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(backend, device, dtype):
    """Same casting order as LlamaRMSNorm: equal up to float32 summation order."""
    hf = LlamaRMSNorm(130, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(4, 9, 130, device=device).to(dtype)
    y = rms_norm(x, hf.weight, 1e-5, backend=backend)
    ref = hf(x)
    if backend == "torch":
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    elif dtype == torch.float32:  # only the float32 summation order differs
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    else:  # each of the two bf16 roundings may land one ulp (2**-7 relative) away: the interpreter
        # truncates float32 -> bf16 casts where the GPU rounds to nearest
        torch.testing.assert_close(y, ref, rtol=2**-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_two_experts(backend, device, dtype, poisoned_allocations):
    x = torch.randn(2, 45, 48, device=device).to(dtype).requires_grad_()
    modality = torch.randint(0, 2, (2, 45), device=device, dtype=torch.int32)
    weights = [torch.randn(48, device=device).to(dtype).requires_grad_() for _ in range(2)]
    y = routed_rms_norm(x, modality, weights, backend=backend)
    ref, x64, w64 = _reference(x, modality, weights)
    assert rel_err(y, ref) <= TOL[dtype]
    _check_grads(y, ref, x, x64, weights, w64, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_routed_three_experts_one_frozen_one_empty(backend, device, poisoned_allocations):
    """Expert 0 frozen (the text norm), expert 2 sees no token: its gradient is exactly zero."""
    x = torch.randn(97, 130, device=device)[:, :].T.contiguous().T.requires_grad_()  # column-major rows
    modality = torch.randint(0, 2, (97,), device=device)  # int64, experts 0 and 1 only
    weights = [torch.randn(130, device=device, requires_grad=(e != 0)) for e in range(3)]
    y = routed_rms_norm(x, modality, weights, backend=backend)
    ref, x64, w64 = _reference(x, modality, weights)
    assert rel_err(y, ref) <= 1e-4
    _check_grads(y, ref, x, x64, weights, w64, torch.float32)
    assert torch.equal(weights[2].grad, torch.zeros_like(weights[2]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_routed_all_frozen_and_deterministic(backend, device):
    x = torch.randn(97, 130, device=device, requires_grad=True)
    modality = torch.randint(0, 3, (97,), device=device)
    weights = [torch.randn(130, device=device, requires_grad=True) for _ in range(3)]
    dy = torch.randn(97, 130, device=device)
    grads = [torch.autograd.grad(routed_rms_norm(x, modality, weights, backend=backend), [x, *weights], dy)
             for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)  # per-program partial sums reduced in a fixed order
    frozen = [w.detach() for w in weights]
    (dx,) = torch.autograd.grad(routed_rms_norm(x, modality, frozen, backend=backend), x, dy)
    assert torch.equal(dx, grads[0][0])


@pytest.mark.parametrize("op", ["rms_norm", "routed_rms_norm"])
def test_compiles_fullgraph(op):
    x = torch.randn(2, 7, 48, requires_grad=True)
    weights = [torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)]
    modality = torch.randint(0, 2, (2, 7))
    if op == "rms_norm":
        fn = lambda x: rms_norm(x, weights[0], backend="torch")  # noqa: E731
    else:
        fn = lambda x: routed_rms_norm(x, modality, weights, backend="torch")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    y, ref = compiled(x), fn(x)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, *weights[: 1 if op == "rms_norm" else 2]], dy)
    g_ref = torch.autograd.grad(ref, [x, *weights[: 1 if op == "rms_norm" else 2]], dy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(7))
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, w.double())
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, [1.0] * 8)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.long(), w)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w.to("meta"))
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, backend="cuda")
    m = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="modality"):
        routed_rms_norm(x, m, [w, w])
    with pytest.raises(ValueError, match="modality"):
        routed_rms_norm(x, m - 1, [w, w, w])
    with pytest.raises(ValueError, match="modality"):
        routed_rms_norm(x, m[:3], [w, w, w])
    with pytest.raises(TypeError, match="modality"):
        routed_rms_norm(x, m.float(), [w, w, w])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        routed_rms_norm(x, m, [w, torch.randn(9), w])
    with pytest.raises(TypeError, match="weights"):
        routed_rms_norm(x, m, torch.stack([w, w, w]))
    with pytest.raises(TypeError, match="weights"):
        routed_rms_norm(x, m, [])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_rows(backend, device):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    weights = [torch.randn(16, device=device, requires_grad=True) for _ in range(2)]
    y = routed_rms_norm(x, torch.zeros(0, 3, dtype=torch.long, device=device), weights, backend=backend)
    y = y + rms_norm(x, weights[0], backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(weights[1].grad, torch.zeros(16, device=device))
