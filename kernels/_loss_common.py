"""What the loss ops share: the finite-input check and the row chunking of their PyTorch backends."""
from __future__ import annotations

import torch

from ._common import is_tracing

# Elements per chunk on the PyTorch backends: big enough to amortise the Python loop, small enough
# that fp32 temporaries stay in cache and reuse the allocator's memory instead of faulting in fresh
# pages (on CPU a fresh (N, D) temporary costs as much as the arithmetic).
CHUNK_ELEMENTS = 1 << 18


def row_chunks(num_rows: int, row_elements: int) -> list[slice]:
    """Row slices covering ``num_rows`` rows of ``row_elements`` each, about CHUNK_ELEMENTS per slice."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [slice(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]


def check_finite_inputs(check_finite: bool | None, **tensors: torch.Tensor) -> None:
    """ValueError naming the first tensor holding NaN/Inf; ``None`` checks CPU tensors only.

    On CUDA a check needs a host sync, so by default it is skipped there; under torch.compile it is
    always skipped (data-dependent). The fast path is one sum per tensor (no temporaries): any
    NaN/Inf element makes it non-finite; only then is the exact elementwise test run (so a finite
    tensor whose sum overflows passes).
    """
    for name, t in tensors.items():
        if not _finite_check_wanted(check_finite, t):
            continue
        acc_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        if not bool(torch.isfinite(t.sum(dtype=acc_dtype))):
            _raise_for_non_finite(**{name: t})


def check_finite_from_sums(check_finite: bool | None, sums: torch.Tensor, **tensors: torch.Tensor) -> None:
    """:func:`check_finite_inputs` for a loss whose forward has already reduced every row of
    ``tensors`` into ``sums`` (squares, dot products): a NaN/Inf element always leaves a NaN/Inf
    there, so the inputs are scanned only when ``sums`` is not finite. The check then costs nothing
    next to the loss (it was a third of a (32, 4, 64, 64) diffusion loss) and the loss is never
    returned from bad input. A finite input whose squares overflow passes, as in the sum test above.
    """
    if _finite_check_wanted(check_finite, sums) and not bool(torch.isfinite(sums).all()):
        _raise_for_non_finite(**tensors)


def _finite_check_wanted(check_finite: bool | None, t: torch.Tensor) -> bool:
    return check_finite is not False and not is_tracing() and (check_finite or t.device.type == "cpu")


def _raise_for_non_finite(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def chunk_buffer(out: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Where a chunk's result is computed: the output rows themselves when already in ``dtype`` (no
    extra pass), else a chunk-sized temporary that :func:`chunk_store` rounds into the output."""
    view = out[rows]
    return view if view.dtype == dtype else torch.empty(view.shape, dtype=dtype, device=view.device)


def chunk_store(out: torch.Tensor, rows: slice, buf: torch.Tensor) -> None:
    if buf.dtype != out.dtype:
        out[rows] = buf
