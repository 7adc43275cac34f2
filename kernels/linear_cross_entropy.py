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

Backends. "torch" chunks the rows (about 32 MiB of fp32 logits per chunk on CPU) and does the
softmax and its gradient in place on the chunk. "triton": a forward kernel gives each program a
block of rows and a range of vocabulary tiles, computes each logits tile ``h @ W_tile^T`` with an
fp32 accumulator over D and folds it into an online max / sum-exp (ranges are split across
programs when the row blocks alone cannot fill the GPU, and their partial statistics are merged
afterwards). Without gradients (evaluation) that is the whole op and no logit is ever written.
With gradients it runs per chunk of rows, stores the chunk's fp32 logits as it goes, then a second
kernel turns them into dlogits and two cuBLAS GEMMs give dh and dW (see :func:`_sweep_triton`).

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
    dot_flags,
    is_tracing,
    resolve_backend,
    triton_interpreting,
)
from ._loss_common import check_finite_inputs

_REDUCTIONS = ("mean", "sum", "none")
_LABEL_DTYPES = (torch.int64, torch.int32)
# Bytes of per-chunk logit buffers: small on CPU (where memory is what the torch backend saves),
# larger on GPUs so that the chunk's dh / dW GEMMs stay big enough for the tensor cores.
_CPU_CHUNK_BYTES = 32 * 2**20
_GPU_CHUNK_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    H, W, LABELS, LOGITS, PART_MAX, PART_SUMEXP, PART_LABEL, PART_SUM,
    n_rows, vocab, dim, cols_per_split, ignore_index,
    stride_hm, stride_hd, stride_wv, stride_wd, stride_lm, stride_lv,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    STORE_LOGITS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M rows against the vocabulary columns of one split, tile by tile.

    Writes the split's partial statistics per row (running max, sum of exp relative to it, the
    label logit if the label falls in this split, sum of logits); the logits themselves are kept
    only when STORE_LOGITS (the gradient pass reads them back instead of recomputing the GEMM).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    labels = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    rows64 = rows.to(tl.int64)  # row * stride overflows int32 for long batches / big vocabularies
    offs_k = tl.arange(0, BLOCK_K)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, vocab)

    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sumexp = tl.zeros([BLOCK_M], dtype=tl.float32)
    label_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    logit_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        logits = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < dim
            h = tl.load(H + rows64[:, None] * stride_hm + ks[None, :] * stride_hd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + cols.to(tl.int64)[:, None] * stride_wv + ks[None, :] * stride_wd,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            logits = tl.dot(h, tl.trans(w), logits, input_precision=DOT_PRECISION)
        if STORE_LOGITS:
            tl.store(LOGITS + rows64[:, None] * stride_lm + cols[None, :] * stride_lv, logits,
                     mask=row_ok[:, None] & col_ok[None, :])
        # Every tile holds at least one real column, so the new max is finite and exp(-inf) = 0
        # takes care of both the padded columns and the first tile's empty running sum.
        masked = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(masked, 1))
        run_sumexp = run_sumexp * tl.exp(run_max - new_max) + tl.sum(tl.exp(masked - new_max[:, None]), 1)
        run_max = new_max
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), 1)
        logit_sum += tl.sum(tl.where(col_ok[None, :], logits, 0.0), 1)

    part = pid_s * n_rows + rows
    tl.store(PART_MAX + part, run_max, mask=row_ok)
    tl.store(PART_SUMEXP + part, run_sumexp, mask=row_ok)
    tl.store(PART_LABEL + part, label_logit, mask=row_ok)
    tl.store(PART_SUM + part, logit_sum, mask=row_ok)


@triton.jit
def _linear_cross_entropy_bwd_kernel(
    LOGITS, DLOGITS, LSE, LABELS, ROW_SCALE,
    n_rows, vocab, ignore_index, label_smoothing, z_loss,
    stride_lm, stride_lv, stride_dm, stride_dv,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program: the logit gradient of one (BLOCK_M, BLOCK_V) tile, from the stored logits.

    DLOGITS may alias LOGITS (fp32 inputs): each element is read once, then written by the same
    program.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols[None, :] < vocab)
    rows64 = rows.to(tl.int64)
    logits = tl.load(LOGITS + rows64[:, None] * stride_lm + cols[None, :] * stride_lv, mask=tile_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    labels = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    scale = tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
    probs = tl.exp(logits - lse[:, None])
    grad = probs * (scale * (1.0 + 2.0 * z_loss * lse))[:, None] - (scale * (label_smoothing / vocab))[:, None]
    grad -= tl.where(cols[None, :] == labels[:, None], (scale * (1.0 - label_smoothing))[:, None], 0.0)
    tl.store(DLOGITS + rows64[:, None] * stride_dm + cols[None, :] * stride_dv,
             grad.to(DLOGITS.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_sizes(dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps) for this hidden size on this process."""
    if triton_interpreting():
        # Interpreted cost is per program x loop iteration: one K step and wide vocab tiles.
        return 16, 128, triton.next_power_of_2(max(dim, 16)), 4
    return 64, 128, 64, 8


def _num_vocab_splits(rows: int, vocab: int, block_m: int, block_v: int, device: torch.device) -> int:
    """Split the vocabulary across programs when too few row blocks exist to fill the GPU."""
    max_splits = triton.cdiv(vocab, block_v)
    if device.type != "cuda":
        # Interpreted: two splits, so that CI runs the cross-split log-sum-exp combine.
        return min(2, max_splits)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(rows, block_m)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(vocab, 4 * block_v)))


def _logit_stats_triton(hidden, weight, labels, ignore_index, logits_out=None):
    """Per-row (lse, label logit, logit sum) in fp32; fills ``logits_out`` (rows, V) if given."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    block_m, block_v, block_k, num_warps = _block_sizes(dim)
    splits = _num_vocab_splits(n_rows, vocab, block_m, block_v, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, cols_per_split)
    parts = torch.empty((4, splits, n_rows), device=hidden.device, dtype=torch.float32)
    store = logits_out is not None
    logits_arg = logits_out if store else parts  # never written when not storing
    torch.library.wrap_triton(_linear_cross_entropy_fwd_kernel)[(triton.cdiv(n_rows, block_m), splits)](
        hidden, weight, labels, logits_arg, parts[0], parts[1], parts[2], parts[3],
        n_rows, vocab, dim, cols_per_split, ignore_index,
        *hidden.stride(), *weight.stride(), *(logits_out.stride() if store else (0, 0)),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, STORE_LOGITS=store,
        # The interpreter's tl.dot on bf16 returns garbage; fp32 inputs stay exact (no tf32).
        **dot_flags(hidden.dtype),
        num_warps=num_warps,
    )
    part_max, part_sumexp, part_label, part_sum = parts
    row_max = part_max.amax(0)
    lse = row_max + torch.log((part_sumexp * torch.exp(part_max - row_max)).sum(0))
    return lse, part_label.sum(0), part_sum.sum(0)


def _logit_grads_triton(logits, dlogits, lse, labels, row_scale, ignore_index, label_smoothing, z_loss):
    """Overwrite ``dlogits`` (rows, V) with d(sum_i row_scale_i * loss_i) / d logits."""
    n_rows, vocab = logits.shape
    block_m, block_v, _, num_warps = _block_sizes(0)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(vocab, block_v))
    torch.library.wrap_triton(_linear_cross_entropy_bwd_kernel)[grid](
        logits, dlogits, lse, labels, row_scale,
        n_rows, vocab, ignore_index, label_smoothing, z_loss,
        *logits.stride(), *dlogits.stride(),
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
    )


def _sweep_triton(hidden, weight, labels, row_scale, ignore_index, label_smoothing, z_loss,
                  compute_dh, compute_dw, chunk_size):
    """Triton backend of :func:`_sweep`.

    Without gradients one launch streams the whole batch and no logit is ever stored. With
    gradients, per chunk of rows: the forward kernel stores the chunk's fp32 logits while reducing
    them, the gradient kernel turns them into dlogits, and two cuBLAS GEMMs give
    ``dh = dlogits @ W`` and ``dW += dlogits^T @ h``. The GEMMs stay in torch on purpose: they are
    plain dense products that cuBLAS runs at full tensor-core rate, and the in-place ``addmm_``
    accumulates dW across chunks without atomics (deterministic).
    """
    n_rows, _ = hidden.shape
    vocab = weight.shape[0]
    valid = labels != ignore_index
    dh, dw = _grad_buffers(hidden, weight, compute_dh, compute_dw)
    if row_scale is None:
        lse, label_logit, logit_sum = _logit_stats_triton(hidden, weight, labels, ignore_index)
        return _row_losses(lse, label_logit, logit_sum, valid, label_smoothing, z_loss, vocab), dh, dw

    chunk = chunk_size or _chunk_rows(n_rows, vocab, 4 + hidden.element_size(), hidden.device)
    logits_buf = torch.empty((min(chunk, n_rows), vocab), device=hidden.device, dtype=torch.float32)
    # fp32: dlogits overwrite the logits in place; otherwise GEMM operands in the input dtype.
    dlogits_buf = logits_buf if hidden.dtype == torch.float32 else torch.empty_like(logits_buf, dtype=hidden.dtype)
    losses = []
    for c0 in range(0, n_rows, chunk):
        c1 = min(n_rows, c0 + chunk)
        h_c, y_c = hidden[c0:c1], labels[c0:c1]
        logits, dlogits = logits_buf[: c1 - c0], dlogits_buf[: c1 - c0]
        lse, label_logit, logit_sum = _logit_stats_triton(h_c, weight, y_c, ignore_index, logits)
        losses.append(_row_losses(lse, label_logit, logit_sum, valid[c0:c1], label_smoothing, z_loss, vocab))
        _logit_grads_triton(logits, dlogits, lse, y_c, row_scale[c0:c1], ignore_index, label_smoothing, z_loss)
        _accumulate_grads(dlogits, h_c, weight, dh[c0:c1] if compute_dh else None, dw if compute_dw else None)
    return torch.cat(losses), dh, dw


# ----------------------------------------------------------------------------------------------
# PyTorch backend: the same chunked sweep with torch ops (what CPU users get)
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


def _chunk_torch(h_c, y_c, weight, scale, dh_c, dw, ignore_index, label_smoothing, z_loss, ct):
    """Losses of one chunk of rows; with ``scale``, also writes dh_c and adds into dw.

    A function of its own so that the chunk's (rows, V) buffer is freed before the next chunk
    allocates its own (a loop variable would keep two alive).
    """
    vocab = weight.shape[0]
    valid = y_c != ignore_index
    target = torch.where(valid, y_c, 0).long()[:, None]  # ignored rows: any column; they are masked
    logits = (h_c @ weight.T).to(ct)  # the GEMM runs in the input dtype, like eager
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


def _sweep_torch(hidden, weight, labels, row_scale, ignore_index, label_smoothing, z_loss,
                 compute_dh, compute_dw, chunk_size):
    """PyTorch backend of :func:`_sweep`: one chunk of (rows, V) logits at a time, softmax in place."""
    n_rows, _ = hidden.shape
    ct = compute_dtype(hidden)
    dh, dw = _grad_buffers(hidden, weight, compute_dh, compute_dw)
    losses = hidden.new_empty(n_rows, dtype=ct)
    chunk = chunk_size or _chunk_rows(n_rows, weight.shape[0], torch.finfo(ct).bits // 8, hidden.device)
    for c0 in range(0, n_rows, chunk):
        c1 = min(n_rows, c0 + chunk)
        scale = None if row_scale is None else row_scale[c0:c1]
        losses[c0:c1] = _chunk_torch(hidden[c0:c1], labels[c0:c1], weight, scale, dh[c0:c1] if compute_dh else None,
                                     dw if compute_dw else None, ignore_index, label_smoothing, z_loss, ct)
    return losses, dh, dw


def _sweep(hidden, weight, labels, row_scale, ignore_index, label_smoothing, z_loss,
           compute_dh, compute_dw, chunk_size, backend):
    """Per-row losses (N,) and, when ``row_scale`` (N,) is given, the gradients of
    ``sum_i row_scale_i * loss_i`` w.r.t. hidden (N, D) and weight (V, D) (empty if not wanted)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=compute_dtype(hidden)), *_grad_buffers(hidden, weight, compute_dh, compute_dw)
    sweep = _sweep_triton if backend == "triton" else _sweep_torch
    return sweep(hidden, weight, labels, row_scale, ignore_index, label_smoothing, z_loss,
                 compute_dh, compute_dw, chunk_size)


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
            (CPU) or 256 MiB (GPU). The result does not depend on it beyond rounding.
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
