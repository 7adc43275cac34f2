"""The fused losses vs the eager PyTorch forms users would otherwise write, side by side in one process.

Each loss contributes a list of :class:`Case` (one function per loss: ``cosine_cases``,
``diffusion_cases``, ``pair_cases``); :data:`CASE_BUILDERS` lists those functions, so another loss
adds its own builder there. Every case times each implementation on the same inputs:

* cosine: ``cosine_loss`` vs ``((1 - F.cosine_similarity(p, t, dim=-1)) * mask).sum() / mask.sum()``
  (MetaMorph's visual-token regression), fwd+bwd;
* diffusion: ``diffusion_loss`` vs ``(((p - t) ** 2).mean(dims) * w).mean()``, fwd+bwd;
* ddpm_v_pair: ``ddpm_training_pair(..., "v_prediction")`` vs diffusers' ``add_noise`` + ``get_velocity``
  formulas, forward only (the noised input is built without grad in training);
* linear_ce: ``linear_cross_entropy`` vs ``F.cross_entropy(h @ W.T, y)`` (and Liger's fused loss where
  installed, on CUDA), fwd+bwd; ``bench_linear_ce.py`` has the larger sweep with memory ratios.

On CPU mmfuse runs its PyTorch backend; "mmfuse_nocheck" is the same call with ``check_finite=False``
(the default NaN/Inf check of CPU inputs). A case's implementations are timed interleaved, one call
of each in turn per round after untimed ones (median over the rounds), so that drift on a shared
machine hits them alike. Rows carry ms, peak extra memory,
``gbps`` (the bytes a fused implementation must move over the time: the same numerator for every
implementation, so it ranks them), ``of_copy`` (that over the device's copy bandwidth, measured in
the same run by :func:`~mmfuse.bench.common.copy_bandwidth_gbps`: 1.0 is a memory-bound kernel at
the ceiling) and ``vs_mmfuse`` (baseline time / mmfuse time).

    python -m mmfuse.bench.bench_losses [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mmfuse.bench.common import (
    CPU_SETTLE_CALLS,
    add_ratio,
    append_results,
    bench_main,
    copy_bandwidth_gbps,
    measure_interleaved,
    print_table,
    time_ms,
)
from mmfuse.kernels.cosine_loss import cosine_loss
from mmfuse.bench.bench_linear_ce import _liger_loss
from mmfuse.bench.bench_linear_ce import sizes as linear_ce_sizes
from mmfuse.kernels.diffusion_loss import ddpm_training_pair, diffusion_loss
from mmfuse.kernels.linear_cross_entropy import linear_cross_entropy


@dataclass
class Case:
    """One benchmark problem: inputs, the implementations to compare on them, and what to time.

    ``impls`` maps a name to ``fn(**inputs) -> tensor`` (a loss, or a tuple for "fwd" cases);
    ``grad_inputs`` names the inputs that get gradients in "fwd+bwd" mode; ``bytes_moved`` is the
    minimum memory traffic of the timed step, for GB/s.
    """

    loss: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    inputs: dict[str, torch.Tensor]
    impls: dict[str, Callable[..., object]]
    grad_inputs: tuple[str, ...] = ()
    bytes_moved: int = 0


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ours(fn: Callable, device: torch.device) -> dict[str, Callable]:
    impls = {"mmfuse": fn}
    if device.type == "cpu":
        impls["mmfuse_nocheck"] = lambda **kw: fn(check_finite=False, **kw)
    return impls


# ----------------------------------------------------------------------------------------------
# One function per loss
# ----------------------------------------------------------------------------------------------


def cosine_cases(quick: bool, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> list[Case]:
    """MetaMorph: SigLIP-width (1152) visual tokens, about half of them generated (selected)."""
    rows_list = ([2048] if quick else [2048, 8192]) if device.type == "cpu" else ([16384] if quick else [16384, 65536])
    rows_list = [64] if tiny else rows_list
    cases = []
    for n in rows_list:
        pred = torch.randn(n, 1152, device=device, dtype=dtype)
        target = torch.randn(n, 1152, device=device, dtype=dtype)
        mask = torch.rand(n, device=device) < 0.5

        def eager(pred, target, mask):
            per_row = 1 - F.cosine_similarity(pred, target, dim=-1)
            return (per_row * mask).sum() / mask.sum()

        ours = _ours(lambda pred, target, mask, **kw: cosine_loss(pred, target, mask, **kw), device)
        # fwd reads p, t; bwd reads p, t and writes dp.
        cases.append(Case("cosine", f"N={n} D=1152", "fwd+bwd", dict(pred=pred, target=target, mask=mask),
                          {**ours, "eager": eager}, ("pred",), _bytes(pred, target) * 2 + _bytes(pred)))
    return cases


def diffusion_cases(quick: bool, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> list[Case]:
    """SD1.5 latents at 512 px (4x64x64) and SANA's at 1024 px (32x32x32), min-SNR-style weights."""
    batch = 32 if device.type == "cpu" else 64
    shapes = [(batch, 4, 64, 64)] if quick else [(batch, 4, 64, 64), (batch, 32, 32, 32)]
    shapes = [(2, 4, 8, 8)] if tiny else shapes
    cases = []
    for shape in shapes:
        pred = torch.randn(shape, device=device, dtype=dtype)
        target = torch.randn(shape, device=device, dtype=dtype)
        weights = torch.rand(shape[0], device=device)

        def eager(pred, target, weights):
            return (((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim()))) * weights).mean()

        ours = _ours(lambda pred, target, weights, **kw: diffusion_loss(pred, target, weights, **kw), device)
        cases.append(Case("diffusion", "x".join(map(str, shape)), "fwd+bwd",
                          dict(pred=pred, target=target, weights=weights), {**ours, "eager": eager}, ("pred",),
                          _bytes(pred, target) * 2 + _bytes(pred)))
    return cases


def pair_cases(quick: bool, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> list[Case]:
    """DDPM v-prediction pair (x_t, v) for SD1.5 latents: read x0 and noise once, write both."""
    batch = 2 if tiny else 32 if device.type == "cpu" else 64
    shape = (batch, 4, 8, 8) if tiny else (batch, 4, 64, 64)
    x0 = torch.randn(shape, device=device, dtype=dtype)
    noise = torch.randn(shape, device=device, dtype=dtype)
    abar = torch.rand(batch, device=device)

    def eager(x0, noise, abar):  # diffusers' add_noise + get_velocity, as a training script calls them
        a = abar.to(x0.dtype).sqrt().view(-1, 1, 1, 1)
        s = (1 - abar.to(x0.dtype)).sqrt().view(-1, 1, 1, 1)
        return a * x0 + s * noise, a * noise - s * x0

    def ours(x0, noise, abar):
        return ddpm_training_pair(x0, noise, abar, "v_prediction")

    return [Case("ddpm_v_pair", "x".join(map(str, shape)), "fwd", dict(x0=x0, noise=noise, abar=abar),
                 {"mmfuse": ours, "eager": eager}, (), _bytes(x0, noise) * 2)]


def linear_ce_cases(quick: bool, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> list[Case]:
    """The LM head + CE at the first size of ``bench_linear_ce`` (Llama-3's V = 128256 on GPU)."""
    ce_dtype, shapes = linear_ce_sizes(True, device, tiny)
    n, d, v = shapes[0]
    hidden = torch.randn(n, d, device=device, dtype=ce_dtype)
    weight = torch.randn(v, d, device=device, dtype=ce_dtype) / d**0.5
    labels = torch.randint(0, v, (n,), device=device)
    impls = {"mmfuse": lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels),
             "eager": lambda hidden, weight, labels: F.cross_entropy(hidden @ weight.T, labels)}
    liger = _liger_loss() if device.type == "cuda" else None
    if callable(liger):
        impls["liger"] = lambda hidden, weight, labels: liger(hidden, weight, labels)
    # fwd reads h and W; the fused backward writes dh and dW.
    return [Case("linear_ce", f"N={n} D={d} V={v}", "fwd+bwd", dict(hidden=hidden, weight=weight, labels=labels),
                 impls, ("hidden", "weight"), _bytes(hidden, weight) * 2)]


# Each builder: (quick, device, dtype, tiny=False) -> cases.
CASE_BUILDERS: list[Callable[..., list[Case]]] = [
    cosine_cases,
    diffusion_cases,
    pair_cases,
    linear_ce_cases,
]


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def make_step(case: Case, fn: Callable) -> Callable[[], object]:
    """The timed step: the loss (no grad) in "fwd" cases; loss and gradients of ``grad_inputs`` otherwise."""
    inputs = {k: (v.detach().requires_grad_() if k in case.grad_inputs else v) for k, v in case.inputs.items()}
    leaves = [inputs[k] for k in case.grad_inputs]

    def step():
        if case.mode == "fwd":
            with torch.no_grad():
                return fn(**inputs)
        return torch.autograd.grad(fn(**inputs), leaves)

    return step


SLOW_STEP_MS = 100.0  # a step slower than this is timed over fewer rounds (it is already steady)
ROUNDS = {"fast": 31, "slow": 5}


def measure_case(case: Case, device: torch.device, copy_gbps: float) -> list[dict]:
    """Every implementation of ``case``, interleaved (:func:`~mmfuse.bench.common.measure_interleaved`)."""
    steps = {name: make_step(case, fn) for name, fn in case.impls.items()}
    first = time_ms(steps["mmfuse"], device, warmup=0, reps=1)["ms"]  # also a warm-up call
    slow = first > SLOW_STEP_MS
    rows = []
    for name, measured in measure_interleaved(steps, device, ROUNDS["slow" if slow else "fast"],
                                              warmup=0 if slow else CPU_SETTLE_CALLS).items():
        row = {"loss": case.loss, "shape": case.shape, "mode": case.mode, "impl": name, **measured}
        if case.bytes_moved and "ms" in row:
            row["gbps"] = case.bytes_moved / (row["ms"] * 1e-3) / 1e9
            row["of_copy"] = row["gbps"] / copy_gbps
        rows.append(row)
    return rows


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_gbps = copy_bandwidth_gbps(device, 8 if tiny else None)
    print(f"  device copy bandwidth: {copy_gbps:.1f} GB/s")
    rows = []
    for build in CASE_BUILDERS:
        for case in build(quick or tiny, device, dtype, tiny):
            rows += measure_case(case, device, copy_gbps)
    add_ratio(rows, ("loss", "shape"), "vs_mmfuse")
    print_table(rows, ["loss", "shape", "mode", "impl", "ms", "vs_mmfuse", "peak_mib", "gbps", "of_copy", "error"])
    config = dict(quick=quick or tiny, tiny=tiny, dtype=str(dtype), cpu_threads=torch.get_num_threads(),
                  copy_gbps=copy_gbps)
    append_results("losses", device, config, rows, out_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="fewer sizes")


if __name__ == "__main__":
    main()
