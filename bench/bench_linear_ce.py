"""linear_cross_entropy vs the LM-head losses users would otherwise run, side by side in one process.

Baselines: eager ``F.cross_entropy(h @ W.T, y)`` (autograd keeps the (N, V) logits, their
log-softmax and their gradient) and Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` where it is
installed (GPU only). On CUDA, mmfuse also runs at fixed chunks of 256 and 1024 rows beside its
default (1 GiB of logits a chunk), which shows what that budget buys. Modes: "fwd" (no grad: an
eval loss) and "fwd+bwd" (dhidden and dweight).
Every row carries ms, peak extra memory and ``mem_vs_eager`` (the CPU target for mmfuse: <= 0.25);
``loss_diff`` is the absolute difference from eager's loss, a sanity check. On CUDA, ``tflops`` counts
only the logits GEMM and its two gradient GEMMs over the rows that are not ignored.

    python -m mmfuse.bench.bench_linear_ce [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmfuse.bench.common import add_ratio, append_results, bench_main, peak_memory_mib, print_table, sync, time_ms
from mmfuse.kernels.linear_cross_entropy import linear_cross_entropy

MODES = ("fwd", "fwd+bwd")
CUDA_CHUNK_SWEEP = (256, 1024)


def _liger_loss() -> Callable | str:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return "liger-kernel not installed"
    loss_fn = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, y: loss_fn(w, h, y)


def implementations(device: torch.device) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {
        "mmfuse": lambda h, w, y: linear_cross_entropy(h, w, y),
        "eager": lambda h, w, y: F.cross_entropy(h @ w.T, y),
    }
    impls["liger"] = _liger_loss() if device.type == "cuda" else "Liger's kernels need CUDA"
    if device.type == "cuda":
        # Fixed smaller chunks beside the default (1 GiB of logits): the evidence for that budget,
        # since each chunk re-reads and re-writes the whole dW.
        for rows in CUDA_CHUNK_SWEEP:
            impls[f"mmfuse_chunk{rows}"] = lambda h, w, y, _rows=rows: linear_cross_entropy(h, w, y, chunk_size=_rows)
    return impls


def make_step(fn: Callable, hidden, weight, labels, mode: str) -> Callable[[], torch.Tensor]:
    """The timed step: the loss (no grad) in "fwd" mode; the loss and dhidden, dweight in "fwd+bwd"."""
    h, w = (t.detach().requires_grad_(mode == "fwd+bwd") for t in (hidden, weight))

    def step():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            loss = fn(h, w, labels)
            if mode == "fwd+bwd":
                torch.autograd.grad(loss, (h, w))
            return loss

    return step


def measure(fn: Callable, hidden, weight, labels, mode: str, device: torch.device, reps: int) -> dict:
    step = make_step(fn, hidden, weight, labels, mode)
    try:
        loss = step()
        sync(device)
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run this size (e.g. out of memory)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
    # Memory first: after the timing loop a CPU allocator may serve the next run from freed pages.
    row = {"peak_mib": peak_memory_mib(step, device), "loss": float(loss.detach())}
    row.update(time_ms(step, device, warmup=1, reps=reps))
    return row


def useful_flops(labels: torch.Tensor, d: int, v: int, mode: str) -> int:
    """The logits GEMM over the rows that count (not ``ignore_index``); the backward's dhidden and
    dweight GEMMs twice that. A fused kernel's recomputed logits are not useful work."""
    fwd = 2 * int((labels != -100).sum()) * d * v
    return fwd if mode == "fwd" else 3 * fwd


def sizes(quick: bool, device: torch.device, tiny: bool = False) -> tuple[torch.dtype, list[tuple[int, int, int]]]:
    """(dtype, [(N tokens, D hidden, V vocabulary)]); toy ones for the test suite when ``tiny``."""
    if tiny:
        return torch.float32, [(64, 32, 512)]
    if device.type == "cuda":
        return torch.bfloat16, [(4096, 4096, 128256)] if quick else [(4096, 4096, 128256), (16384, 4096, 128256)]
    return torch.float32, [(1024, 256, 32000)] if quick else [(4096, 1024, 32000), (4096, 2048, 32000)]


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    dtype, cases = sizes(quick or tiny, device, tiny)
    reps = (2 if tiny else 3) if device.type == "cpu" else 10
    rows = []
    for n, d, v in cases:
        hidden = torch.randn(n, d, device=device, dtype=dtype)
        weight = (torch.randn(v, d, device=device) * d**-0.5).to(dtype)
        labels = torch.randint(0, v, (n,), device=device)
        labels[::7] = -100  # some padding, as in a packed batch
        for mode in MODES:
            for name, fn in implementations(device).items():
                row = {"impl": name, "mode": mode, "N": n, "D": d, "V": v, "dtype": str(dtype).removeprefix("torch.")}
                row.update({"error": fn} if isinstance(fn, str) else measure(fn, hidden, weight, labels, mode, device, reps))
                if device.type == "cuda" and row.get("ms"):
                    row["tflops"] = useful_flops(labels, d, v, mode) / (row["ms"] * 1e-3) / 1e12
                rows.append(row)
                print(f"  {name:7s} {mode:8s} N={n} D={d} V={v}: {row.get('ms', '-')} ms, {row.get('peak_mib', '-')} MiB")
        del hidden, weight, labels
    _add_ratios(rows)
    print_table(rows, ["N", "D", "V", "mode", "impl", "ms", "vs_mmfuse", "peak_mib", "mem_vs_eager", "tflops",
                       "loss_diff", "error"])
    config = dict(quick=quick or tiny, tiny=tiny, dtype=str(dtype), cases=cases, reps=reps)
    append_results("linear_cross_entropy", device, config, rows, out_dir)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """``vs_mmfuse``: time over mmfuse's (> 1: mmfuse faster); ``mem_vs_eager``: peak over eager's."""
    case = ("N", "D", "V", "mode")
    add_ratio(rows, case, "vs_mmfuse")
    add_ratio(rows, case, "mem_vs_eager", reference="eager", value="peak_mib")
    eager = {tuple(r[f] for f in case): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        base = eager.get(tuple(r[f] for f in case), {})
        if "loss" in r and "loss" in base:
            r["loss_diff"] = abs(r["loss"] - base["loss"])


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="one small size")


if __name__ == "__main__":
    main()
