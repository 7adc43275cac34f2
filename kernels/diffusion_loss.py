"""Diffusion objectives: the weighted per-sample MSE and the fused (x_t, target) training pairs.

* :func:`diffusion_loss` -- ``mean_b w_b * mean((pred_b - target_b) ** 2)``: each program reduces a
  chunk of one sample into a partial sum (no atomics, so the result is deterministic); the backward
  is one elementwise pass writing ``dpred`` (and ``dtarget`` when the target requires grad).
* :func:`ddpm_training_pair` / :func:`flow_matching_pair` -- the noised input and the regression
  target in one pass over ``x0`` and the noise. Both are ``out1 = a_b u + b_b v``,
  ``out2 = c_b u + d_b v`` with per-sample coefficients, so one kernel serves both, and their
  backward is the same kernel with the coefficient matrix transposed.

Layout: Triton kernels -> launchers -> PyTorch backend -> custom ops + autograd -> public functions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    compute_dtype,
    eager_autograd,
    is_tracing,
    op_or_body,
    resolve_backend,
    runs_body_directly,
    triton_interpreting,
)
from ._loss_common import check_finite_from_sums, check_finite_inputs, chunk_buffer, chunk_store, row_chunks

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _diffusion_loss_fwd_kernel(
    P, T, W, PARTIAL, M, stride_pb, stride_pm, stride_tb, stride_tm,
    HAS_WEIGHTS: tl.constexpr, SKIP_ZERO_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """Program (chunk c, sample b): PARTIAL[b, c] = sum over the chunk of (p - t)^2, in fp32."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # b * stride may pass 2**31
    # A sample with weight 0 (masked out) is never read, so garbage there cannot leak into the loss
    # (unless the weights need a gradient, which is that sample's MSE).
    num_read = M
    if SKIP_ZERO_WEIGHT:
        num_read = tl.where(tl.load(W + b) != 0, M, 0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = (c * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        m = offs < num_read
        p = tl.load(P + b * stride_pb + offs * stride_pm, mask=m, other=0.0).to(tl.float32)
        t = tl.load(T + b * stride_tb + offs * stride_tm, mask=m, other=0.0).to(tl.float32)
        diff = p - t
        acc += diff * diff
    tl.store(PARTIAL + b * tl.num_programs(0) + c, tl.sum(acc, 0))


@triton.jit
def _diffusion_loss_bwd_kernel(
    P, T, W, GRAD_SCALE, DP, DT, M,
    stride_pb, stride_pm, stride_tb, stride_tm, stride_dpb, stride_dpm, stride_dtb, stride_dtm,
    HAS_WEIGHTS: tl.constexpr, COMPUTE_DP: tl.constexpr, COMPUTE_DT: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """dp = 2 g w_b (p - t) / (B M) = -dt; GRAD_SCALE holds 2 g / (B M)."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # b * stride may pass 2**31
    scale = tl.load(GRAD_SCALE)
    if HAS_WEIGHTS:
        scale = scale * tl.load(W + b).to(tl.float32)
    num_read = tl.where(scale != 0, M, 0)
    for i in range(ITERS):
        offs = (c * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offs < M
        m = offs < num_read
        p = tl.load(P + b * stride_pb + offs * stride_pm, mask=m, other=0.0).to(tl.float32)
        t = tl.load(T + b * stride_tb + offs * stride_tm, mask=m, other=0.0).to(tl.float32)
        dp = scale * (p - t)
        if COMPUTE_DP:
            tl.store(DP + b * stride_dpb + offs * stride_dpm, dp.to(DP.dtype.element_ty), mask=in_bounds)
        if COMPUTE_DT:
            tl.store(DT + b * stride_dtb + offs * stride_dtm, (-dp).to(DT.dtype.element_ty), mask=in_bounds)


@triton.jit
def _mix_pair_kernel(
    U, V, COEF, OUT1, OUT2, M,
    stride_ub, stride_um, stride_vb, stride_vm, stride_1b, stride_1m, stride_2b, stride_2m,
    WRITE_OUT2: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """Program (chunk c, sample b): out1 = a u + b v and out2 = c u + d v, (a, b, c, d) = COEF[b]."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # b * stride may pass 2**31
    ca = tl.load(COEF + b * 4)
    cb = tl.load(COEF + b * 4 + 1)
    cc = tl.load(COEF + b * 4 + 2)
    cd = tl.load(COEF + b * 4 + 3)
    for i in range(ITERS):
        offs = (c * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        m = offs < M
        u = tl.load(U + b * stride_ub + offs * stride_um, mask=m, other=0.0).to(tl.float32)
        v = tl.load(V + b * stride_vb + offs * stride_vm, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT1 + b * stride_1b + offs * stride_1m, (ca * u + cb * v).to(OUT1.dtype.element_ty), mask=m)
        if WRITE_OUT2:
            tl.store(OUT2 + b * stride_2b + offs * stride_2m, (cc * u + cd * v).to(OUT2.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launchers: a (chunks, B) grid over (B, M) views
# ----------------------------------------------------------------------------------------------


def _chunking(num_elements: int) -> tuple[int, int, int, int]:
    """(BLOCK, ITERS, chunks, num_warps): 2K elements a program on a GPU (enough programs to fill it
    for a few SD latents), big numpy tiles when interpreted."""
    if triton_interpreting():
        block, iters = min(triton.next_power_of_2(num_elements), 8192), 1
    else:
        block = min(triton.next_power_of_2(num_elements), 1024)
        iters = max(1, min(2, triton.cdiv(num_elements, block)))
    return block, iters, triton.cdiv(num_elements, block * iters), 4


def _diffusion_fwd_triton(pred, target, weights, skip_zero_weight):
    B, M = pred.shape
    block, iters, chunks, num_warps = _chunking(M)
    partial = torch.empty(B, chunks, device=pred.device, dtype=torch.float32)
    torch.library.wrap_triton(_diffusion_loss_fwd_kernel)[(chunks, B)](
        pred, target, pred if weights is None else weights, partial, M, *pred.stride(), *target.stride(),
        HAS_WEIGHTS=weights is not None, SKIP_ZERO_WEIGHT=skip_zero_weight, BLOCK=block, ITERS=iters,
        num_warps=num_warps,
    )
    return _weighted_mean(partial.sum(1) / M, weights, pred.dtype)


def _diffusion_bwd_triton(grad, pred, target, weights, compute_dp, compute_dt):
    B, M = pred.shape
    block, iters, chunks, num_warps = _chunking(M)
    dp = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_dp else pred.new_empty(0)
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if compute_dt else target.new_empty(0)
    grad_scale = (grad.float() * (2.0 / (B * M))).reshape(1)
    torch.library.wrap_triton(_diffusion_loss_bwd_kernel)[(chunks, B)](
        pred, target, pred if weights is None else weights, grad_scale, dp, dt, M,
        *pred.stride(), *target.stride(), *(dp.stride() if compute_dp else (0, 0)),
        *(dt.stride() if compute_dt else (0, 0)),
        HAS_WEIGHTS=weights is not None, COMPUTE_DP=compute_dp, COMPUTE_DT=compute_dt,
        BLOCK=block, ITERS=iters, num_warps=num_warps,
    )
    return dp, dt


def _mix_pair_triton(u, v, coef, write_out2):
    B, M = u.shape
    block, iters, chunks, num_warps = _chunking(M)
    out1 = torch.empty(B, M, device=u.device, dtype=u.dtype)
    out2 = torch.empty_like(out1) if write_out2 else out1.new_empty(0)
    torch.library.wrap_triton(_mix_pair_kernel)[(chunks, B)](
        u, v, coef, out1, out2, M, *u.stride(), *v.stride(), *out1.stride(),
        *(out2.stride() if write_out2 else (0, 0)),
        WRITE_OUT2=write_out2, BLOCK=block, ITERS=iters, num_warps=num_warps,
    )
    return out1, out2


# ----------------------------------------------------------------------------------------------
# PyTorch backend
# ----------------------------------------------------------------------------------------------


def _weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype):
    """(loss in ``dtype``, per-sample MSE); a weight of 0 drops its sample even when that is NaN."""
    if weights is None:
        return per_sample.mean().to(dtype), per_sample
    w = weights.to(per_sample.dtype)
    return torch.where(w != 0, w * per_sample, 0.0).mean().to(dtype), per_sample


def _diffusion_fwd_torch(pred, target, weights):
    ct = compute_dtype(pred, target)
    B, M = pred.shape
    sq_sum = torch.empty(B, device=pred.device, dtype=ct)
    for rows in row_chunks(B, M):  # (p - t) per chunk: no (B, M) temporary
        diff = pred[rows].to(ct) - target[rows].to(ct)
        sq_sum[rows] = torch.linalg.vector_norm(diff, dim=1).square()
    return _weighted_mean(sq_sum / M, weights, pred.dtype)


def _diffusion_bwd_torch(grad, pred, target, weights, compute_dp, compute_dt):
    ct = compute_dtype(pred, target)
    B, M = pred.shape
    scale = (grad.to(ct) * (2.0 / (B * M))).expand(B)
    if weights is not None:
        scale = scale * weights.to(ct)
    scale = scale[:, None]
    dp = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_dp else pred.new_empty(0)
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if compute_dt else target.new_empty(0)
    for rows in row_chunks(B, M):
        p, t = pred[rows].to(ct), target[rows].to(ct)
        if compute_dp:
            buf = torch.sub(p, t, out=chunk_buffer(dp, rows, ct)).mul_(scale[rows])
            chunk_store(dp, rows, buf)
        if compute_dt:
            buf = torch.sub(t, p, out=chunk_buffer(dt, rows, ct)).mul_(scale[rows])
            chunk_store(dt, rows, buf)
    return dp, dt


def _mix_pair_torch(u, v, coef, write_out2):
    ct = compute_dtype(u, v)
    B, M = u.shape
    coef = coef.to(ct)
    out1 = torch.empty(B, M, device=u.device, dtype=u.dtype)
    out2 = torch.empty_like(out1) if write_out2 else out1.new_empty(0)
    for rows in row_chunks(B, M):
        uc, vc, cf = u[rows].to(ct), v[rows].to(ct), coef[rows]
        buf = torch.mul(uc, cf[:, 0:1], out=chunk_buffer(out1, rows, ct)).addcmul_(vc, cf[:, 1:2])
        chunk_store(out1, rows, buf)
        if write_out2:
            buf = torch.mul(uc, cf[:, 2:3], out=chunk_buffer(out2, rows, ct)).addcmul_(vc, cf[:, 3:4])
            chunk_store(out2, rows, buf)
    return out1, out2


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd (torch.compile traces through these without graph breaks)
# ----------------------------------------------------------------------------------------------


def _diffusion_loss_fwd(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, skip_zero_weight: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _diffusion_fwd_triton(pred, target, weights, skip_zero_weight)
    return _diffusion_fwd_torch(pred, target, weights)


_diffusion_loss_fwd_op = torch.library.custom_op("mmfuse::diffusion_loss_fwd", mutates_args=())(_diffusion_loss_fwd)


@_diffusion_loss_fwd_op.register_fake
def _(pred, target, weights, skip_zero_weight, backend):
    per_sample_dtype = compute_dtype(pred, target) if backend == "torch" else torch.float32
    return pred.new_empty(()), pred.new_empty((pred.shape[0],), dtype=per_sample_dtype)


def _diffusion_loss_bwd(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, backend: str,
    compute_dp: bool, compute_dt: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _diffusion_bwd_triton(grad, pred, target, weights, compute_dp, compute_dt)
    return _diffusion_bwd_torch(grad, pred, target, weights, compute_dp, compute_dt)


_diffusion_loss_bwd_op = torch.library.custom_op("mmfuse::diffusion_loss_bwd", mutates_args=())(_diffusion_loss_bwd)


@_diffusion_loss_bwd_op.register_fake
def _(grad, pred, target, weights, backend, compute_dp, compute_dt):
    dp = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_dp else pred.new_empty(0)
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if compute_dt else target.new_empty(0)
    return dp, dt


def _diffusion_setup_context(ctx, inputs, output):
    pred, target, weights, _, backend = inputs
    ctx.save_for_backward(pred, target, weights, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _diffusion_backward(ctx, grad_loss, _grad_per_sample):
    pred, target, weights, per_sample = ctx.saved_tensors
    compute_dp, compute_dt, compute_dw = ctx.needs_input_grad[:3]
    dp = dt = dw = None
    if compute_dp or compute_dt:
        bwd = op_or_body(ctx, _diffusion_loss_bwd_op, _diffusion_loss_bwd)
        dp, dt = bwd(grad_loss, pred, target, weights, ctx.backend, compute_dp, compute_dt)
    if compute_dw:  # d/dw_b of mean_b w_b L_b
        dw = (grad_loss.to(per_sample.dtype) * per_sample / pred.shape[0]).to(weights.dtype)
    return (dp if compute_dp else None), (dt if compute_dt else None), dw, None, None


_diffusion_loss_fwd_op.register_autograd(_diffusion_backward, setup_context=_diffusion_setup_context)
_diffusion_loss_call = eager_autograd(
    _diffusion_loss_fwd_op, _diffusion_loss_fwd, _diffusion_setup_context, _diffusion_backward)


def _mix_pair(
    u: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, write_out2: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _mix_pair_triton(u, v, coef, write_out2)
    return _mix_pair_torch(u, v, coef, write_out2)


_mix_pair_op = torch.library.custom_op("mmfuse::mix_pair", mutates_args=())(_mix_pair)


@_mix_pair_op.register_fake
def _(u, v, coef, write_out2, backend):
    out1 = torch.empty_like(u, memory_format=torch.contiguous_format)
    return out1, (torch.empty_like(out1) if write_out2 else u.new_empty(0))


def _mix_setup_context(ctx, inputs, output):
    _, _, coef, write_out2, backend = inputs
    ctx.save_for_backward(coef)
    ctx.write_out2, ctx.backend = write_out2, backend


def _mix_backward(ctx, grad1, grad2):
    (coef,) = ctx.saved_tensors
    # (du, dv) = [[a, c], [b, d]] (g1, g2): the same op with the coefficient matrix transposed.
    mix = op_or_body(ctx, _mix_pair_op, _mix_pair)
    if ctx.write_out2:
        du, dv = mix(grad1, grad2, coef[:, [0, 2, 1, 3]].contiguous(), True, ctx.backend)
    else:  # out2 was not produced: (du, dv) = (a g1, b g1)
        zero = torch.zeros_like(coef[:, :1])
        coef_t = torch.cat([coef[:, 0:1], zero, coef[:, 1:2], zero], dim=1)
        du, dv = mix(grad1, grad1, coef_t, True, ctx.backend)
    return du, dv, None, None, None


_mix_pair_op.register_autograd(_mix_backward, setup_context=_mix_setup_context)
_mix_pair_call = eager_autograd(_mix_pair_op, _mix_pair, _mix_setup_context, _mix_backward)


# ----------------------------------------------------------------------------------------------
# Checks and public functions
# ----------------------------------------------------------------------------------------------


def _float_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    return FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())


def _per_sample_view(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, M), a view whenever the strides allow (the kernels take any 2-D strides)."""
    return x.reshape(x.shape[0], -1)


def _check_batched(name: str, x: torch.Tensor, backend: str) -> None:
    check_tensor(name, x, dtypes=_float_dtypes(backend))
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name} must have shape (B, ...) with no zero-size dimension, got {tuple(x.shape)}")


def _check_per_sample(name: str, w: torch.Tensor, batch: int, backend: str) -> None:
    check_tensor(name, w, dtypes=_float_dtypes(backend), shape=(batch,))


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    check_finite: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted diffusion MSE: ``mean_b w_b * mean((pred_b - target_b) ** 2)``.

    Args:
        pred: (B, ...) fp16 / bf16 / fp32 (fp64 on the torch backend): the model's noise / velocity /
            flow prediction for B samples.
        target: (B, ...), same shape (any of those dtypes); gets a gradient if it requires one.
        weights: (B,) per-sample weights (e.g. min-SNR, or a 0/1 selection rescaled by the caller),
            or None for all ones. Gets a gradient if it requires one. A sample with weight 0 is
            never read by the Triton kernel (unless the weights require grad).
        check_finite: raise ``ValueError`` naming pred or target if it holds NaN/Inf, never
            returning the loss. The PyTorch backend reads every sample anyway, so it tests the
            per-sample sums it computed (free); the Triton backend tests the inputs before its
            kernel. None (default) checks CPU tensors only: on CUDA the check would cost a host
            sync per call, so there a NaN input is not caught here and comes out as a NaN loss.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        A 0-dim tensor in pred's dtype (accumulated in fp32).
    """
    backend = resolve_backend(backend, check_tensor("pred", pred), check_tensor("target", target))
    _check_batched("pred", pred, backend)
    check_tensor("target", target, dtypes=_float_dtypes(backend), shape=tuple(pred.shape))
    if weights is not None:
        _check_per_sample("weights", weights, pred.shape[0], backend)
        check_same_device(pred=pred, target=target, weights=weights)
    else:
        check_same_device(pred=pred, target=target)
    if backend == "triton":  # its kernel skips zero-weight samples: test the inputs themselves
        check_finite_inputs(check_finite, pred=pred, target=target)
    skip_zero_weight = weights is not None and not weights.requires_grad
    loss, per_sample = _diffusion_loss_call(_per_sample_view(pred), _per_sample_view(target), weights,
                                            skip_zero_weight, backend)
    if backend == "torch":  # every sample's sum of squares
        check_finite_from_sums(check_finite, per_sample, pred=pred, target=target)
    return loss


def _check_pair_inputs(x0, noise, name, per_sample, backend) -> None:
    _check_batched("x0", x0, backend)
    check_tensor("noise", noise, dtypes=(x0.dtype,), shape=tuple(x0.shape))
    _check_per_sample(name, per_sample, x0.shape[0], backend)
    check_same_device(x0=x0, noise=noise, **{name: per_sample})
    # Data-dependent: only where it costs no host sync.
    if is_tracing() or per_sample.device.type != "cpu":
        return
    low, high = (float(x) for x in torch.aminmax(per_sample))  # one reduction
    if not (0 <= low and high <= 1):  # written so that NaN fails too
        raise ValueError(f"{name} values must lie in [0, 1], got [{low}, {high}]")


def _mix(x0, noise, coef, write_out2, backend):
    u, v, coef = _per_sample_view(x0), _per_sample_view(noise), coef.contiguous()
    if runs_body_directly(backend, x0, noise):  # the usual training call: clean latents and noise need no grad
        out1, out2 = _mix_pair_torch(u, v, coef, write_out2)
    else:
        out1, out2 = _mix_pair_call(u, v, coef, write_out2, backend)
    return out1.view(x0.shape), (out2.view(x0.shape) if write_out2 else None)


def ddpm_training_pair(
    x0: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod_t: torch.Tensor,
    prediction_type: str = "epsilon",
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM noised input and regression target in one pass over ``x0`` and ``noise``.

    ``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise`` (diffusers ``DDPMScheduler.add_noise``); the target is
    ``noise`` ("epsilon"), ``x0`` itself ("sample") or ``v = sqrt(abar) noise - sqrt(1 - abar) x0``
    ("v_prediction", diffusers ``get_velocity``). Coefficients are computed in fp32 and outputs rounded once.

    Args:
        x0: (B, ...) clean samples (e.g. VAE latents), fp16 / bf16 / fp32 (fp64 on the torch backend).
        noise: (B, ...) same shape and dtype.
        alphas_cumprod_t: (B,) float, ``alphas_cumprod[timesteps]``, values in [0, 1].
        prediction_type: "epsilon", "sample" or "v_prediction".
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        ``(x_t, target)``, each (B, ...) in x0's dtype; for "epsilon" the target is ``noise`` itself,
        for "sample" ``x0`` itself.
        Differentiable with respect to x0 and noise.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    backend = resolve_backend(backend, check_tensor("x0", x0), check_tensor("noise", noise))
    _check_pair_inputs(x0, noise, "alphas_cumprod_t", alphas_cumprod_t, backend)
    abar = alphas_cumprod_t.to(compute_dtype(x0))
    sqrt_a_1ma = torch.stack([abar, 1 - abar], dim=1).sqrt_()  # (B, 2): [sqrt(abar), sqrt(1 - abar)]
    if prediction_type in ("epsilon", "sample"):
        x_t, _ = _mix(x0, noise, torch.nn.functional.pad(sqrt_a_1ma, (0, 2)), False, backend)
        return x_t, noise if prediction_type == "epsilon" else x0
    # v = sqrt(abar) noise - sqrt(1 - abar) x0: the second row is the first's [-s, a]
    coef = torch.cat([sqrt_a_1ma, sqrt_a_1ma.flip(1) * sqrt_a_1ma.new_tensor([-1.0, 1.0])], dim=1)
    return _mix(x0, noise, coef, True, backend)


def flow_matching_pair(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow noised input and velocity target in one pass over ``x0`` and ``noise``.

    ``x_t = (1 - sigma) x0 + sigma noise`` (diffusers ``FlowMatchEulerDiscreteScheduler.scale_noise``)
    and ``target = noise - x0`` (the SD3 / SANA training target).

    Args:
        x0: (B, ...) clean samples, fp16 / bf16 / fp32 (fp64 on the torch backend).
        noise: (B, ...) same shape and dtype.
        sigmas: (B,) float in [0, 1] (see :func:`mmfuse.kernels.schedules.sample_sigmas`).
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        ``(x_t, target)``, each (B, ...) in x0's dtype; differentiable with respect to x0 and noise.
    """
    backend = resolve_backend(backend, check_tensor("x0", x0), check_tensor("noise", noise))
    _check_pair_inputs(x0, noise, "sigmas", sigmas, backend)
    s = sigmas.to(compute_dtype(x0))
    coef = torch.stack([1 - s, s, -torch.ones_like(s), torch.ones_like(s)], dim=1)
    return _mix(x0, noise, coef, True, backend)
