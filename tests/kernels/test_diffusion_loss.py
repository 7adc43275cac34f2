"""diffusion_loss and the fused training pairs vs float64 references and diffusers' schedulers."""
import importlib

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from mmfuse.kernels.diffusion_loss import ddpm_training_pair, diffusion_loss, flow_matching_pair
from tests.helpers import rel_err, triton_devices

diffusion_mod = importlib.import_module("mmfuse.kernels.diffusion_loss")

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in triton_devices()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def reference_loss(pred, target, weights):
    """mean_b w_b * mean over the sample of (pred_b - target_b)^2, in float64."""
    per_sample = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    return (per_sample if weights is None else per_sample * weights.double()).mean()


def assert_close(name, got, want, dtype):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name} has NaN"
    err = rel_err(got, want)
    assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"


def run_loss_case(pred, target, weights, backend, device, dtype, target_grad=True):
    leaves = {"pred": pred.to(device).detach().requires_grad_(),
              "target": target.to(device).detach().requires_grad_(target_grad)}
    if weights is not None:
        leaves["weights"] = weights.to(device).detach().requires_grad_()
    loss = diffusion_loss(leaves["pred"], leaves["target"], leaves.get("weights"), backend=backend)
    wanted = [k for k, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wanted])
    ref_leaves = {k: t.detach().double().requires_grad_(t.requires_grad) for k, t in leaves.items()}
    ref = reference_loss(ref_leaves["pred"], ref_leaves["target"], ref_leaves.get("weights"))
    ref_grads = torch.autograd.grad(ref, [ref_leaves[k] for k in wanted])
    assert_close("loss", loss, ref, dtype)
    for k, g, rg in zip(wanted, grads, ref_grads):
        assert_close(f"d{k}", g, rg, dtype)


# (B, ...): one sample, an awkward latent (72), SD-like latents, and a sample longer than one
# interpreted chunk (9000 > 8192) so a sample's partial sums come from several programs.
SHAPES = [(1, 72), (3, 4, 5, 7), (2, 4, 9, 9), (2, 9000)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_reference(backend, device, dtype, shape, weighted, poisoned_allocations):
    gen = torch.Generator().manual_seed(sum(shape))
    pred = torch.randn(shape, generator=gen).to(dtype)
    target = torch.randn(shape, generator=gen).to(dtype)
    weights = torch.rand(shape[0], generator=gen) + 0.5 if weighted else None
    run_loss_case(pred, target, weights, backend, device, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_weights_and_non_contiguous(backend, device):
    base = torch.randn(8, 4, 6, 6)
    pred = base[::2]  # batch stride 2M: the kernels read it in place
    target = torch.randn(4, 6, 6, 4).permute(0, 3, 1, 2)  # not viewable as (B, M): copied
    weights = torch.tensor([0.0, 1.5, 0.0, 0.25])
    run_loss_case(pred, target, weights, backend, device, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_target_without_grad(backend, device):
    run_loss_case(torch.randn(3, 50), torch.randn(3, 50), None, backend, device, torch.float32, target_grad=False)


@pytest.mark.parametrize("device", triton_devices())
def test_zero_weight_sample_is_never_read_by_triton(device):
    backend = "triton"
    pred, target = torch.randn(3, 40), torch.randn(3, 40)
    pred[1] = float("nan")
    weights = torch.tensor([1.0, 0.0, 2.0])
    loss = diffusion_loss(pred.to(device), target.to(device), weights.to(device), check_finite=False,
                          backend=backend)
    keep = torch.tensor([0, 2])
    assert rel_err(loss, reference_loss(pred[keep], target[keep], weights[keep]) * 2 / 3) <= 1e-6


def test_compiles_without_graph_breaks():
    def objective(pred, target, weights):
        return diffusion_loss(pred, target, weights, backend="torch") * 2.0

    pred, target, weights = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)
    p1 = pred.clone().requires_grad_()
    out = torch.compile(objective, fullgraph=True, backend="aot_eager")(p1, target, weights)
    out.backward()
    p2 = pred.clone().requires_grad_()
    ref = objective(p2, target, weights)
    ref.backward()
    assert rel_err(out, ref) < 1e-6 and rel_err(p1.grad, p2.grad) < 1e-6


# ---------------------------------------------------------------------------------------------
# Training pairs: diffusers' add_noise / get_velocity / scale_noise are the references
# ---------------------------------------------------------------------------------------------


def _latents(B, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 5, 7, generator=gen).to(dtype), torch.randn(B, 4, 5, 7, generator=gen).to(dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_pair_equals_diffusers(backend, device, prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=prediction_type)
    x0, noise = _latents(5, torch.float32, seed=1)
    t = torch.tensor([0, 17, 500, 998, 999])
    x_t, target = ddpm_training_pair(x0.to(device), noise.to(device), sched.alphas_cumprod[t].to(device),
                                     prediction_type, backend=backend)
    want_target = {"epsilon": noise, "sample": x0}.get(prediction_type)
    want_target = sched.get_velocity(x0, noise, t) if want_target is None else want_target
    assert rel_err(x_t, sched.add_noise(x0, noise, t)) <= 1e-6
    assert rel_err(target, want_target) <= 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_flow_matching_pair_equals_diffusers(backend, device):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    x0, noise = _latents(4, torch.float32, seed=2)
    idx = torch.tensor([0, 250, 731, 999])
    x_t, target = flow_matching_pair(x0.to(device), noise.to(device), sched.sigmas[idx].to(device), backend=backend)
    assert rel_err(x_t, sched.scale_noise(x0, sched.timesteps[idx], noise)) <= 1e-6
    assert rel_err(target, noise - x0) <= 1e-6  # the SD3 / SANA training target


def _pair_reference(x0, noise, coef_abar_or_sigma, kind):
    c = coef_abar_or_sigma.double().view(-1, *([1] * (x0.dim() - 1)))
    if kind == "flow":
        return (1 - c) * x0 + c * noise, noise - x0
    x_t = c.sqrt() * x0 + (1 - c).sqrt() * noise
    return x_t, (noise if kind == "epsilon" else c.sqrt() * noise - (1 - c).sqrt() * x0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_pair_values_and_grads(backend, device, dtype, kind, poisoned_allocations):
    x0, noise = _latents(3, dtype, seed=3)
    x0 = x0.transpose(2, 3)  # non-contiguous inputs
    noise = noise.transpose(2, 3)
    level = torch.tensor([0.05, 0.5, 0.97])
    x0_l, noise_l = (t.to(device).requires_grad_() for t in (x0, noise))
    if kind == "flow":
        out = flow_matching_pair(x0_l, noise_l, level.to(device), backend=backend)
    else:
        out = ddpm_training_pair(x0_l, noise_l, level.to(device), kind, backend=backend)
    g_xt, g_target = torch.randn_like(out[0]), torch.randn_like(out[1])
    grads = torch.autograd.grad(out, (x0_l, noise_l), (g_xt, g_target))
    x0_r, noise_r = (t.detach().double().requires_grad_() for t in (x0, noise))
    ref = _pair_reference(x0_r, noise_r, level, kind)
    ref_grads = torch.autograd.grad(ref, (x0_r, noise_r), (g_xt.double(), g_target.double()))
    assert out[0].dtype == out[1].dtype == dtype
    for name, got, want in zip(("x_t", "target", "dx0", "dnoise"), (*out, *grads), (*ref, *ref_grads)):
        assert_close(name, got, want, dtype)


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError naming the argument, before any kernel runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the input check")

    for name in ("_diffusion_fwd_triton", "_diffusion_fwd_torch", "_mix_pair_triton", "_mix_pair_torch"):
        monkeypatch.setattr(diffusion_mod, name, boom)


def _good():
    return dict(pred=torch.randn(4, 3, 8), target=torch.randn(4, 3, 8), weights=torch.rand(4))


@pytest.mark.parametrize("change,error,words", [
    (dict(target=torch.randn(4, 3, 7)), ValueError, "target"),
    (dict(target=torch.randn(4, 24)), ValueError, "target"),
    (dict(weights=torch.rand(3)), ValueError, "weights"),
    (dict(weights=torch.rand(4, 1)), ValueError, "weights"),
    (dict(weights=torch.ones(4, dtype=torch.int64)), TypeError, "weights"),
    (dict(pred=torch.randn(4, 3, 8).to(torch.int32)), TypeError, "pred"),
    (dict(pred=torch.randn(0, 3), target=torch.randn(0, 3)), ValueError, "pred"),
    (dict(weights=torch.rand(4, device="meta")), ValueError, "weights"),
    (dict(pred=None), TypeError, "pred"),
])
def test_loss_bad_input(change, error, words, no_kernels):
    args = {**_good(), **change}
    with pytest.raises(error, match=words):
        diffusion_loss(args["pred"], args["target"], args["weights"], backend="torch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["pred", "target"])
@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_non_finite_input_rejected_on_cpu(bad, name, weight):
    """The torch backend tests the per-sample sums its forward computed: a zero-weight sample counts too."""
    args = _good()
    args[name][2, 1, 0] = bad
    args["weights"][2] = weight
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        diffusion_loss(args["pred"], args["target"], args["weights"], backend="torch")


def test_finite_inputs_with_overflowing_squares_pass():
    pred = torch.full((2, 8), 3e38)  # finite; its squares overflow: the exact check lets it through
    assert torch.isinf(diffusion_loss(pred, torch.zeros(2, 8), backend="torch"))


@pytest.mark.parametrize("device", triton_devices())
def test_non_finite_input_rejected_before_the_triton_kernel(device, no_kernels):
    args = {k: v.to(device) for k, v in _good().items()}
    args["pred"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pred contains NaN"):
        diffusion_loss(args["pred"], args["target"], args["weights"], check_finite=True, backend="triton")


@pytest.mark.parametrize("call,error,words", [
    (lambda x, n, a: ddpm_training_pair(x, n[:, :2], a), ValueError, "noise"),
    (lambda x, n, a: ddpm_training_pair(x, n.double(), a), TypeError, "noise"),
    (lambda x, n, a: ddpm_training_pair(x, n, a[:2]), ValueError, "alphas_cumprod_t"),
    (lambda x, n, a: ddpm_training_pair(x, n, a + 1.5), ValueError, "alphas_cumprod_t"),
    (lambda x, n, a: ddpm_training_pair(x, n, a, "x0"), ValueError, "prediction_type"),
    (lambda x, n, a: flow_matching_pair(x, n, a[None]), ValueError, "sigmas"),
    (lambda x, n, a: flow_matching_pair(x, n, -a), ValueError, "sigmas"),
    (lambda x, n, a: flow_matching_pair(x.long(), n, a), TypeError, "x0"),
])
def test_pair_bad_input(call, error, words, no_kernels):
    with pytest.raises(error, match=words):
        call(torch.randn(4, 3, 8), torch.randn(4, 3, 8), torch.rand(4))


def test_pair_compiles_without_graph_breaks():
    def noised(x0, noise, abar):
        x_t, v = ddpm_training_pair(x0, noise, abar, "v_prediction", backend="torch")
        return (x_t * v).sum()

    x0, noise = _latents(3, torch.float32, seed=4)
    abar = torch.tensor([0.1, 0.5, 0.9])
    x1 = x0.clone().requires_grad_()
    out = torch.compile(noised, fullgraph=True, backend="aot_eager")(x1, noise, abar)
    out.backward()
    x2 = x0.clone().requires_grad_()
    ref = noised(x2, noise, abar)
    ref.backward()
    assert rel_err(out, ref) < 1e-6 and rel_err(x1.grad, x2.grad) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_across_row_chunks(dtype, monkeypatch):
    monkeypatch.setattr(importlib.import_module("mmfuse.kernels._loss_common"), "CHUNK_ELEMENTS", 300)
    pred, target = torch.randn(9, 4, 5, 7).to(dtype), torch.randn(9, 4, 5, 7).to(dtype)  # 2 samples a chunk
    run_loss_case(pred, target, torch.rand(9) + 0.5, "torch", "cpu", dtype)
    x0, noise = _latents(9, dtype, seed=5)
    level = torch.rand(9)
    x_t, v = ddpm_training_pair(x0, noise, level, "v_prediction", backend="torch")
    ref_xt, ref_v = _pair_reference(x0.double(), noise.double(), level, "v_prediction")
    assert_close("x_t", x_t, ref_xt, dtype)
    assert_close("v", v, ref_v, dtype)
