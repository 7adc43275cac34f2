"""swiglu against a float64 reference, on plain, fused-projection and transposed inputs."""
import pytest
import torch

from mmfuse.kernels.swiglu import _as_rows, swiglu
from tests.helpers import rel_err, triton_devices

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _reference(gate, up):
    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    return g64 / (1.0 + torch.exp(-g64)) * u64, g64, u64


def _inputs(shape, dtype, device, layout):
    """(leaves, views): ``views(leaves)`` gives (gate, up) as separate tensors, the halves of one fused
    (..., 2I) tensor, or transposed views; applied to the leaves' gradients it gives (dgate, dup)."""
    I = shape[-1]
    if layout == "separate":
        leaves = [torch.randn(shape, device=device) * 3, torch.randn(shape, device=device)]
        views = lambda ts: tuple(ts)  # noqa: E731
    elif layout == "fused":
        leaves = [torch.randn(*shape[:-1], 2 * I, device=device) * 3]
        views = lambda ts: (ts[0][..., :I], ts[0][..., I:])  # noqa: E731
    else:
        reverse = list(range(len(shape)))[::-1]
        leaves = [torch.randn(shape[::-1], device=device) * 3, torch.randn(shape[::-1], device=device)]
        views = lambda ts: tuple(t.permute(reverse) for t in ts)  # noqa: E731
    return [t.to(dtype).requires_grad_() for t in leaves], views


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (97, 130), (2, 3, 80), (5, 1030)])
@pytest.mark.parametrize("layout", ["separate", "fused", "transposed"])
def test_swiglu_matches_float64(backend, device, dtype, shape, layout, poisoned_allocations):
    leaves, views = _inputs(shape, dtype, device, layout)
    gate, up = views(leaves)
    if layout != "separate" and gate.numel() > shape[-1]:  # a single row always counts as contiguous
        assert not (gate.is_contiguous() or up.is_contiguous())
    y = swiglu(gate, up, backend=backend)
    ref, g64, u64 = _reference(gate, up)
    assert y.shape == gate.shape and y.dtype == dtype and y.is_contiguous() and not torch.isnan(y).any()
    assert rel_err(y, ref) <= TOL[dtype]
    dy = torch.randn_like(ref)
    grads = views(torch.autograd.grad(y, leaves, dy.to(dtype)))
    ref.backward(dy)
    for g, g_ref in zip(grads, (g64.grad, u64.grad)):
        assert not torch.isnan(g).any()
        assert rel_err(g, g_ref) <= TOL[dtype]


def test_fused_halves_are_read_in_place():
    h = torch.randn(3, 4, 2 * 48)
    for half in (h[..., :48], h[..., 48:]):
        rows = _as_rows(half)
        assert rows.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()


def test_compiles_fullgraph():
    h = torch.randn(2, 7, 2 * 48, requires_grad=True)

    def fn(h):
        return swiglu(h[..., :48], h[..., 48:], backend="torch")

    y, ref = torch.compile(fn, fullgraph=True)(h), fn(h)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, h, dy)[0], torch.autograd.grad(ref, h, dy)[0])


def test_bad_inputs():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="up"):
        swiglu(g, torch.randn(4, 9))
    with pytest.raises(TypeError, match="up"):
        swiglu(g, g.half())
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.long(), g.long())
    with pytest.raises(TypeError, match="up"):
        swiglu(g, 1.0)
    with pytest.raises(ValueError, match="up"):
        swiglu(g, g.to("meta"))
    with pytest.raises(ValueError, match="gate"):
        swiglu(torch.randn(4, 0), torch.randn(4, 0))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_rows(backend, device):
    h = torch.randn(0, 3, 32, device=device, requires_grad=True)
    y = swiglu(h[..., :16], h[..., 16:], backend=backend)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert h.grad.shape == h.shape
