"""Inference on the torch backend calls the ops' PyTorch bodies directly, not through their custom
ops (whose dispatch outweighs decode-sized arithmetic), and gets what the op gives."""
import pytest
import torch

from mmfuse.kernels import (apply_rope, ddpm_training_pair, mixed_attention, rms_norm, routed_linear, routed_rms_norm,
                            routed_swiglu_mlp, swiglu)
from tests.helpers import count_calls, rel_err


def _inputs(seed: int, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in shapes]


def _rope(q, k, cos, sin):
    return torch.cat([t.flatten() for t in apply_rope(q, k, cos, sin, backend="torch")])


def _attention(q, k, v):
    kv_start = torch.tensor([[0], [2]], dtype=torch.int32)
    kv_end = torch.tensor([[7], [0]], dtype=torch.int32)  # the second row sees nothing: zeros
    return mixed_attention(q, k, v, kv_start, kv_end, backend="torch")


def _pair(x0, noise, a):
    return torch.cat([t.flatten() for t in ddpm_training_pair(x0, noise, a.sigmoid(), "v_prediction", backend="torch")])


_MODALITY = torch.tensor([[1, 0, 0, 1, 1], [0, 1, 0, 0, 1]])  # interleaved: the routed ops sort and un-sort


def _routed_linear(x, w0, w1, b0, b1):
    return routed_linear(x, _MODALITY, [w0, w1], [b0, b1], backend="torch")


def _routed_mlp(x, gate_up0, gate_up1, down0, down1):
    return routed_swiglu_mlp(x, _MODALITY, [gate_up0, gate_up1], [down0, down1], backend="torch")


# name -> (call, input shapes, the custom op it must skip, tolerance vs the op's result)
CASES = {
    "ddpm_training_pair": (_pair, [(2, 3, 4), (2, 3, 4), (2,)], ("mmfuse.kernels.diffusion_loss", "_mix_pair_op"), 0.0),
    "rms_norm": (lambda x, w: rms_norm(x, w, backend="torch"), [(3, 5, 24), (24,)],
                 ("mmfuse.kernels.rms_norm", "_rms_norm_fwd_op"), 0.0),
    "routed_rms_norm": (lambda x, w0, w1: routed_rms_norm(x, torch.tensor([[0, 1, 1]]), [w0, w1], backend="torch"),
                        [(1, 3, 24), (24,), (24,)], ("mmfuse.kernels.rms_norm", "_rms_norm_fwd_op"), 0.0),
    "rope": (_rope, [(2, 4, 3, 16), (2, 2, 3, 16), (2, 3, 16), (2, 3, 16)], ("mmfuse.kernels.rope", "_rope_op"), 0.0),
    "swiglu": (lambda g, u: swiglu(g, u, backend="torch"), [(4, 2, 40), (4, 2, 40)],
               ("mmfuse.kernels.swiglu", "_swiglu_fwd_op"), 0.0),
    # A different (dense, few-query) form of the same attention, so equal to rounding.
    "mixed_attention": (_attention, [(2, 4, 1, 16), (2, 2, 9, 16), (2, 2, 9, 16)],
                        ("mmfuse.kernels.mixed_attention", "_mixed_attention_fwd_op"), 1e-6),
    # Expert weights come as lists: the eager Function takes them flattened.
    "routed_linear": (_routed_linear, [(2, 5, 16), (24, 16), (24, 16), (24,), (24,)],
                      ("mmfuse.kernels.routed_linear", "_routed_linear_fwd_op"), 0.0),
    "routed_swiglu_mlp": (_routed_mlp, [(2, 5, 16), (48, 16), (48, 16), (16, 24), (16, 24)],
                          ("mmfuse.kernels.routed_mlp", "_gate_up_swiglu_op"), 0.0),
}


@pytest.mark.parametrize("name", CASES)
def test_inference_skips_the_custom_op_and_matches_it(name, monkeypatch):
    call, shapes, (module, op), tol = CASES[name]
    inputs = _inputs(0, *shapes)
    through_op = call(inputs[0].clone().requires_grad_(), *inputs[1:]).detach()  # grad wanted: the op
    calls = count_calls(monkeypatch, {"op": (module, op)})
    with torch.no_grad():
        direct = call(*inputs)
    assert calls["op"] == 0, f"{name}: the custom op ran under no_grad"
    assert direct.shape == through_op.shape and direct.dtype == through_op.dtype
    assert rel_err(direct, through_op) <= tol, f"{name}: {rel_err(direct, through_op):.3g}"


def test_inputs_without_grad_outside_no_grad_also_skip_the_op(monkeypatch):
    calls = count_calls(monkeypatch, {"op": ("mmfuse.kernels.rms_norm", "_rms_norm_fwd_op"),
                                      "autograd": ("mmfuse.kernels.rms_norm", "_rms_norm_call")})
    x, w = _inputs(1, (2, 8), (8,))
    rms_norm(x, w, backend="torch")
    assert (calls["op"], calls["autograd"]) == (0, 0)
    rms_norm(x, w.requires_grad_(), backend="torch")  # a trainable weight: the op's autograd, eagerly
    assert (calls["op"], calls["autograd"]) == (0, 1)


@pytest.mark.parametrize("name", CASES)
def test_eager_autograd_equals_the_custom_op(name):
    """Eager training calls each op's body through a plain autograd.Function (no dispatcher); under
    torch.compile the custom op runs. Same body, same backward: equal values and gradients."""
    call, shapes, _, _ = CASES[name]
    inputs = _inputs(2, *shapes)
    trainable = 2 if name in ("rope", "ddpm_training_pair") else len(inputs)  # none for cos / sin, abar

    def run(fn):
        args = [t.clone().requires_grad_(i < trainable) for i, t in enumerate(inputs)]
        out = fn(*args)
        return out, torch.autograd.grad(out, args[:trainable], torch.ones_like(out))

    eager, grads = run(call)
    torch._dynamo.reset()
    traced, traced_grads = run(torch.compile(call, backend="aot_eager", fullgraph=True))
    assert rel_err(traced, eager) <= 1e-6
    for g, t in zip(grads, traced_grads):
        assert rel_err(t, g) <= 1e-6


def _graph_ops(fn, *args) -> set[str]:
    """The targets of the FX graph torch.compile(fullgraph=True) traces for ``fn(*args)``."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("name", ["rms_norm", "rope", "swiglu"])
def test_compiled_inference_traces_the_plain_form(name):
    """Under torch.compile without gradients the elementwise ops put plain PyTorch into the graph
    (which Inductor can fuse) instead of their opaque custom op; with gradients the op stays."""
    call, shapes, _, _ = CASES[name]
    inputs = _inputs(3, *shapes)
    with torch.no_grad():
        eager = call(*inputs)
        ops = _graph_ops(call, *inputs)
        torch._dynamo.reset()
        traced = torch.compile(call, backend="aot_eager", fullgraph=True)(*inputs)
    assert not any("mmfuse" in op for op in ops), ops
    assert traced.shape == eager.shape and rel_err(traced, eager) <= 1e-6
    training = _graph_ops(call, inputs[0].clone().requires_grad_(), *inputs[1:])
    assert any("mmfuse" in op for op in training), training
