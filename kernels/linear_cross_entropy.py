"""Fused LM head + cross-entropy: ``F.cross_entropy(hidden @ weight.T, labels)`` without the logits.

With Llama-3's vocabulary (V = 128256) the (N, V) logits of a long batch dwarf everything else a
training step holds, and eager autograd keeps two or three copies of them (logits, log-softmax,
their gradient). This op never holds more than one chunk of tokens' logits:

* the loss of a row only needs its log-sum-exp, its label logit and (for label smoothing) the sum
  of its logits, all reducible tile by tile with an online max / sum-exp;
* the gradient w.r.t. the logits is ``softmax - target`` scaled per row, known right after that
  row's log-sum-exp, so the forward pass computes the gradients of ``hidden`` and ``weight`` in
  the same sweep (like Liger-Kernel's FusedLinearCrossEntropy) and the backward only scales the
  stored gradients by the incoming scalar.

Per row ``i`` with logits ``z``, label ``y``, smoothing ``eps`` and z-loss weight ``zl``::

    lse_i  = logsumexp_j z_j
    loss_i = (1 - eps) * (lse_i - z_y) + eps * (lse_i - mean_j z_j) + zl * lse_i ** 2
    dloss_i / dz_j = softmax_j * (1 + 2 * zl * lse_i) - (1 - eps) * [j == y] - eps / V

Both backends run the same chunked sweep over rows. Per chunk, the logits GEMM ``h_c @ W^T``
writes the chunk's (rows, V) logits in the input dtype (cuBLAS on the GPU, like eager), the row
reductions and the logit gradient are formed in place on that one buffer, and two more GEMMs give
``dh_c = dlogits @ W`` and ``dW += dlogits^T @ h_c``. "torch" does the softmax with torch ops on
an fp32 copy (what CPU users get); "triton" reads each row twice in one kernel (pass 1: online
max / sum-exp in fp32; pass 2: the gradient, written over the logits), so on top of eager's three
GEMMs there are two reads and one write of the logits instead of eager's chain of softmax passes.

Why the GEMMs stay in cuBLAS and GPU chunks are large: cuBLAS runs the three dense products at the
tensor cores' full rate, and the only cost chunking adds is that dW's accumulation reads and writes
the whole (V, D) gradient once per chunk. Next to the chunk's own dW GEMM that traffic takes about
``2 * FLOPS / (bandwidth * rows)`` of its time, ~420 / rows on an H100 (~700 bf16 TFLOP/s over
3.35 TB/s): more than the GEMM itself at the few hundred rows a fixed small chunk gives at
V = 128256, ~10% at 4k rows. So a GPU chunk holds up to 1 GiB of logits (4186 rows of bf16 at
V = 128256); the eval path (no grad) uses the same chunks and kernel without the gradient pass.

Layout of this file: Triton kernels -> launchers -> PyTorch backend -> custom ops + autograd ->
public function.
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
    is_tracing,
    resolve_backend,
    triton_interpreting,
)
from ._loss_common import check_finite_inputs

_REDUCTIONS = ("mean", "sum", "none")
_LABEL_DTYPES = (torch.int64, torch.int32)
# Bytes of per-chunk logit buffers: small on CPU (where memory is what the torch backend saves),
# large on GPUs so that dW's per-chunk read-modify-write stays small next to its GEMM (see above).
_CPU_CHUNK_BYTES = 32 * 2**20
_GPU_CHUNK_BYTES = 2**30


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    LOGITS, LABELS, ROW_SCALE, LSE, LABEL_LOGIT, LOGIT_SUM,
    vocab, ignore_index, label_smoothing, z_loss, stride_lm,
    BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    """One program: one row of a chunk's logits, (V,) in the input dtype, read twice.

    Pass 1 folds the row tile by tile into an online max / sum-exp (fp32) and writes the row's
    log-sum-exp, label logit and logit sum. With COMPUTE_GRAD, pass 2 overwrites the row with
    ``ROW_SCALE[row] * d loss_row / d logits`` (0 on ignored rows), which the dh / dW GEMMs read.
    """
    row = tl.program_id(0)
    row_ptr = LOGITS + row.to(tl.int64) * stride_lm  # row * stride overflows int32 at V = 128256
    label = tl.load(LABELS + row)
    offs = tl.arange(0, BLOCK_V)

    run_max = float("-inf")
    run_sumexp = 0.0
    logit_sum = 0.0
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + offs
        z = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        # Every tile holds at least one real column, so the new max is finite, and exp(-inf) = 0
        # takes care of the padded columns and of the first tile's empty running sum.
        new_max = tl.maximum(run_max, tl.max(z, 0))
        run_sumexp = run_sumexp * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        run_max = new_max
        logit_sum += tl.sum(tl.where(cols < vocab, z, 0.0), 0)
    lse = run_max + tl.log(run_sumexp)
    valid = label != ignore_index
    label_logit = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LABEL_LOGIT + row, label_logit)
    tl.store(LOGIT_SUM + row, logit_sum)

    if COMPUTE_GRAD:
        scale = tl.load(ROW_SCALE + row)  # 0 on ignored rows: their gradient row is all zeros
        prob_scale = scale * (1.0 + 2.0 * z_loss * lse)
        smooth = scale * (label_smoothing / vocab)
        hit = scale * (1.0 - label_smoothing)
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + offs
            col_ok = cols < vocab
            z = tl.load(row_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) * prob_scale - smooth - tl.where(cols == label, hit, 0.0)
            tl.store(row_ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _row_block(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel for this vocabulary on this process."""
    if triton_interpreting():
        # Interpreted cost is per program x loop iteration; 128 still gives several tiles per row in
        # the tests, so CI runs the online max / sum-exp across tiles.
        return min(128, triton.next_power_of_2(vocab)), 4
    block_v = min(4096, triton.next_power_of_2(vocab))
    return block_v, 8 if block_v >= 2048 else 4


def _chunk_triton(h_c, y_c, weight, scale, dh_c, dw, ignore_index, label_smoothing, z_loss):
    """Triton backend of one chunk: see :func:`_chunk_torch` (same arguments and result)."""
    rows, vocab = h_c.shape[0], weight.shape[0]
    logits = torch.mm(h_c, weight.T)  # (rows, V), input dtype; reused in place for the gradient
    stats = torch.empty((3, rows), device=h_c.device, dtype=torch.float32)
    block_v, num_warps = _row_block(vocab)
    compute_grad = scale is not None
    torch.library.wrap_triton(_linear_cross_entropy_fwd_kernel)[(rows,)](
        logits, y_c, scale if compute_grad else stats, stats[0], stats[1], stats[2],
        vocab, ignore_index, label_smoothing, z_loss, logits.stride(0),
        BLOCK_V=block_v, COMPUTE_GRAD=compute_grad, num_warps=num_warps,
    )
    lse, label_logit, logit_sum = stats
    losses = _row_losses(lse, label_logit, logit_sum, y_c != ignore_index, label_smoothing, z_loss, vocab)
    if compute_grad:
        _accumulate_grads(logits, h_c, weight, dh_c, dw)
    return losses


# ----------------------------------------------------------------------------------------------
# PyTorch backend and the chunked sweep both backends share
# ----------------------------------------------------------------------------------------------


def _chunk_rows(n_rows: int, vocab: int, bytes_per_logit: int, device: torch.device) -> int:
    """Rows per chunk so that the chunk's logit buffers stay within this device's budget."""
    budget = _GPU_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    return max(1, min(n_rows, budget // (vocab * bytes_per_logit)))


def _grad_buffers(hidden, weight, compute_dh, compute_dw):
    """dh (N, D) written chunk by chunk; dW (V, D) accumulated, so zeroed. Empty when not needed."""
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if compute_dh else hidden.new_empty(0)
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if compute_dw else weight.new_empty(0)
    return dh, dw


def _row_losses(lse, label_logit, logit_sum, valid, label_smoothing, z_loss, vocab):
    """Per-row loss from the three reductions of its logits; 0 on ignored rows."""
    loss = lse - (1.0 - label_smoothing) * label_logit
    if label_smoothing:
        loss = loss - (label_smoothing / vocab) * logit_sum
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(valid, loss, 0.0)


def _accumulate_grads(dlogits, h_c, weight, dh_c, dw):
    """dh_c = dlogits @ W; dw += dlogits^T @ h_c (GEMMs in the input dtype, fp32 accumulate); None: skip.

    dW accumulates in place in the weight's dtype: no extra (V, D) buffer; with bf16 weights that
    rounds once per chunk (the GEMM itself accumulates in fp32).
    """
    if dh_c is not None:
        torch.mm(dlogits, weight, out=dh_c)
    if dw is not None:
        dw.addmm_(dlogits.T, h_c)


def _chunk_torch(h_c, y_c, weight, scale, dh_c, dw, ignore_index, label_smoothing, z_loss):
    """Per-row losses (rows,) of one chunk of rows; with ``scale`` (rows,), also writes dh_c (the
    gradient of ``sum_i scale_i * loss_i`` w.r.t. h_c) and adds that of the weight into dw.

    A function of its own so that the chunk's (rows, V) buffer is freed before the next chunk
    allocates its own (a loop variable would keep two alive).
    """
    vocab = weight.shape[0]
    valid = y_c != ignore_index
    target = torch.where(valid, y_c, 0).long()[:, None]  # ignored rows: any column; they are masked
    logits = (h_c @ weight.T).to(compute_dtype(h_c))  # the GEMM runs in the input dtype, like eager
    label_logit = logits.gather(1, target).squeeze(1)
    logit_sum = logits.sum(1) if label_smoothing else None
    # In place, no second (rows, V) buffer: logits -> exp(z - max) -> dlogits.
    row_max = logits.amax(1)
    exp_shifted = logits.sub_(row_max[:, None]).exp_()
    sumexp = exp_shifted.sum(1)
    lse = row_max + sumexp.log()
    losses = _row_losses(lse, label_logit, logit_sum, valid, label_smoothing, z_loss, vocab)
    if scale is None:
        return losses
    # softmax * scale * (1 + 2 zl lse) in one pass over the chunk (the softmax itself is never kept).
    dlogits = exp_shifted.mul_((scale * (1.0 + 2.0 * z_loss * lse) / sumexp)[:, None])
    if label_smoothing:
        dlogits.sub_((scale * (label_smoothing / vocab))[:, None])
    dlogits.scatter_add_(1, target, -(scale * (1.0 - label_smoothing))[:, None])
    _accumulate_grads(dlogits.to(h_c.dtype), h_c, weight, dh_c, dw)
    return losses


def _bytes_per_logit(hidden: torch.Tensor, backend: str) -> int:
    """Triton keeps the chunk's logits in the input dtype; the torch backend works on an fp32 copy."""
    return hidden.element_size() if backend == "triton" else torch.finfo(compute_dtype(hidden)).bits // 8


def _sweep(hidden, weight, labels, row_scale, ignore_index, label_smoothing, z_loss,
           compute_dh, compute_dw, chunk_size, backend):
    """Per-row losses (N,) and, when ``row_scale`` (N,) is given, the gradients of
    ``sum_i row_scale_i * loss_i`` w.r.t. hidden (N, D) and weight (V, D) (empty if not wanted),
    one chunk of (rows, V) logits at a time."""
    n_rows = hidden.shape[0]
    dh, dw = _grad_buffers(hidden, weight, compute_dh, compute_dw)
    losses = hidden.new_empty(n_rows, dtype=compute_dtype(hidden))
    chunk = chunk_size or _chunk_rows(n_rows, weight.shape[0], _bytes_per_logit(hidden, backend), hidden.device)
    chunk_fn = _chunk_triton if backend == "triton" else _chunk_torch
    for c0 in range(0, n_rows, chunk):
        c1 = min(n_rows, c0 + chunk)
        scale = None if row_scale is None else row_scale[c0:c1]
        losses[c0:c1] = chunk_fn(hidden[c0:c1], labels[c0:c1], weight, scale, dh[c0:c1] if compute_dh else None,
                                 dw if compute_dw else None, ignore_index, label_smoothing, z_loss)
    return losses, dh, dw


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd (torch.compile traces through these without graph breaks)
# ----------------------------------------------------------------------------------------------


def _row_scale(labels, ignore_index, reduction, dtype):
    """Weight of each row's loss in the reduced loss: 1 / n_valid (mean), 1 (sum), 0 when ignored."""
    valid = (labels != ignore_index).to(dtype)
    if reduction == "mean":
        return valid / valid.sum().clamp(min=1.0)  # all ignored: every weight 0, loss 0, no NaN
    return valid


@torch.library.custom_op("mmfuse::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, reduction: str, compute_dh: bool, compute_dw: bool,
    chunk_size: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ct = compute_dtype(hidden)
    args = (ignore_index, label_smoothing, z_loss)
    if reduction == "none":  # per-row weights are only known in backward: gradients computed there
        losses, dh, dw = _sweep(hidden, weight, labels, None, *args, False, False, chunk_size, backend)
        return losses, dh, dw
    row_scale = _row_scale(labels, ignore_index, reduction, ct)
    wants_grad = compute_dh or compute_dw
    losses, dh, dw = _sweep(hidden, weight, labels, row_scale if wants_grad else None, *args,
                            compute_dh, compute_dw, chunk_size, backend)
    return (losses * row_scale).sum(), dh, dw


@_linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, compute_dh, compute_dw,
      chunk_size, backend):
    ct = compute_dtype(hidden)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=ct)
    grads_now = reduction != "none"
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grads_now and compute_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if grads_now and compute_dw else weight.new_empty(0)
    return loss, dh, dw


@torch.library.custom_op("mmfuse::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd_op(
    grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, compute_dh: bool, compute_dw: bool,
    chunk_size: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for reduction="none": a second sweep with the incoming per-row gradients as weights."""
    row_scale = torch.where(labels != ignore_index, grad_losses.to(compute_dtype(hidden)), 0.0)
    _, dh, dw = _sweep(hidden, weight, labels, row_scale.contiguous(), ignore_index, label_smoothing, z_loss,
                       compute_dh, compute_dw, chunk_size, backend)
    return dh, dw


@_linear_cross_entropy_bwd_op.register_fake
def _(grad_losses, hidden, weight, labels, ignore_index, label_smoothing, z_loss, compute_dh, compute_dw,
      chunk_size, backend):
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if compute_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if compute_dw else weight.new_empty(0)
    return dh, dw


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, compute_dh, compute_dw, \
        chunk_size, backend = inputs
    _, dh, dw = output
    ctx.mark_non_differentiable(dh, dw)
    ctx.set_materialize_grads(False)  # else backward gets zero-filled (N, D) and (V, D) grads for dh, dw
    ctx.reduction, ctx.compute_dh, ctx.compute_dw = reduction, compute_dh, compute_dw
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, labels)
        ctx.options = (ignore_index, label_smoothing, z_loss, compute_dh, compute_dw, chunk_size, backend)
    else:
        ctx.save_for_backward(dh, dw)
        ctx.grads_consumed = False


def _backward(ctx, grad_loss, _grad_dh, _grad_dw):
    if ctx.reduction == "none":
        hidden, weight, labels = ctx.saved_tensors
        dh, dw = _linear_cross_entropy_bwd_op(grad_loss, hidden, weight, labels, *ctx.options)
    else:
        # The gradients were computed in the forward sweep; only the chain-rule scalar is left. It is
        # applied in place: an out-of-place product would hold a second weight-sized dW at the peak
        # (the saved tensors are released before AccumulateGrad, which then takes them as .grad).
        if ctx.grads_consumed:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same graph "
                               "(retain_graph=True); its stored gradients are scaled in place, so "
                               "recompute the loss for a second backward")
        ctx.grads_consumed = True
        dh, dw = ctx.saved_tensors
        dh, dw = dh.mul_(grad_loss.to(dh.dtype)), dw.mul_(grad_loss.to(dw.dtype))
    return (dh if ctx.compute_dh else None, dw if ctx.compute_dw else None) + (None,) * 9


_linear_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size, backend):
    float_dtypes = FLOAT_DTYPES if backend == "triton" else FLOAT_DTYPES + (torch.float64,)
    check_tensor("hidden", hidden, dtypes=float_dtypes)
    if hidden.dim() < 2 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape (..., D) with D > 0 and at least 2 dims, got {tuple(hidden.shape)}")
    dim = hidden.shape[-1]
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,))
    check_tensor("weight", weight, shape=(None, dim))
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V > 0)")
    check_tensor("labels", labels, dtypes=_LABEL_DTYPES, shape=tuple(hidden.shape[:-1]))
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if is_tracing():  # data-dependent checks: skipped under torch.compile
        return
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}, "
                         f"got {int(labels[bad][0])}")
    # A NaN scan is a pass over hidden plus a host sync: done on CPU only (see the docstring).
    check_finite_inputs(None, hidden=hidden)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ...)`` without ever holding the (N, V) logits.

    Args:
        hidden: (..., D) fp16 / bf16 / fp32 (fp64 on the torch backend); any strides.
        weight: (V, D), the LM head (or tied embedding), same dtype. If it does not require grad
            (a frozen head), no dW is computed.
        labels: int64 / int32 (...), hidden's leading shape; values in [0, V) or ``ignore_index``.
        ignore_index: label value whose rows contribute no loss and get zero gradients.
        label_smoothing: as in ``F.cross_entropy``: the target mixes ``1 - eps`` on the label with
            ``eps / V`` on every class.
        z_loss: PaLM's auxiliary z-loss weight: adds ``z_loss * logsumexp(logits) ** 2`` per row,
            reduced like the cross-entropy (so with "mean", averaged over the non-ignored rows).
            Typical value 1e-4; keeps the softmax normaliser near 1.
        reduction: "mean" (over non-ignored rows; 0 when every row is ignored, not NaN like
            ``F.cross_entropy``), "sum", or "none" (per-row losses, ignored rows 0).
        chunk_size: rows per chunk; None picks it so that one chunk's logits take about 32 MiB
            (CPU) or 1 GiB (GPU). The result does not depend on it beyond rounding.
        backend: None (Triton on CUDA, PyTorch otherwise), "torch" or "triton".

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): a scalar, or labels' shape for "none".

    With "mean" / "sum" and grad enabled, the forward pass computes dhidden and dweight in the same
    chunked sweep and keeps them (one hidden-sized and one weight-sized tensor) until backward,
    which only scales them. With "none" the backward sweeps again, weighted by the incoming
    per-row gradients. Bad labels raise ValueError on every device (one host sync). NaN in
    ``hidden`` (or Inf) raises ValueError on CPU; on CUDA that scan (a full read plus a host sync) is
    skipped and a NaN row makes the loss and the gradients NaN, which the training loop's
    non-finite-loss check catches.
    """
    backend = resolve_backend(backend, hidden, weight, labels)
    _check_inputs(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size, backend)
    grad_on = torch.is_grad_enabled()
    compute_dh = grad_on and hidden.requires_grad
    compute_dw = grad_on and weight.requires_grad
    lead_shape = labels.shape
    loss, _, _ = _linear_cross_entropy_fwd_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1).contiguous(), ignore_index,
        float(label_smoothing), float(z_loss), reduction, compute_dh, compute_dw, chunk_size or 0, backend,
    )
    return loss.view(lead_shape) if reduction == "none" else loss
