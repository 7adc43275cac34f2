"""The per-token kernels vs the eager PyTorch forms a model would otherwise run, side by side.

* rms_norm: ``rms_norm`` vs transformers' ``LlamaRMSNorm``;
* routed_rms_norm: ``routed_rms_norm`` (2 modalities) vs both norms over every token + ``torch.where``
  (how LlamaFusion-style code routes without a kernel);
* rope: ``apply_rope`` vs transformers' ``apply_rotary_pos_emb``, q/k as views of a fused qkv output;
* swiglu: ``swiglu`` vs ``F.silu(g) * u`` on the halves of a fused gate/up output.

Each in "fwd" (no grad), "bwd" (backward through a kept graph) and "fwd+bwd" mode. On CPU mmfuse runs
its PyTorch backend, on CUDA its Triton kernels. Rows carry ms, the peak extra memory, ``gbps`` (the
bytes a fused implementation must move over the time: one numerator for every implementation, so it
ranks them) and ``vs_mmfuse`` (baseline time / mmfuse time; > 1: mmfuse is faster).

    python -m mmfuse.bench.bench_norms [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from mmfuse.bench.common import add_ratio, append_results, bench_main, measure_interleaved, print_table, settle_calls
from mmfuse.kernels.rms_norm import rms_norm, routed_rms_norm
from mmfuse.kernels.rope import apply_rope, rope_cos_sin, rope_frequencies
from mmfuse.kernels.swiglu import swiglu


@dataclass
class Case:
    """One problem: ``make()`` builds the input tensor, ``views(t)`` the impls' arguments from it.

    In "fwd+bwd" mode the input gets the gradient (through the views, as in a model where q/k or
    gate/up are slices of one projection output); ``fwd_bytes`` / ``bwd_bytes`` are the minimum
    memory traffic of each pass (for GB/s).
    """

    op: str
    shape: str
    make: Callable[[], torch.Tensor]
    views: Callable[[torch.Tensor], tuple]
    impls: dict[str, Callable[..., object]]
    fwd_bytes: int
    bwd_bytes: int


MODES = ("fwd", "bwd", "fwd+bwd")


def _sizes(quick: bool, device: torch.device, tiny: bool = False) -> dict[str, int]:
    """Tokens N, hidden D, FFN width I, heads (Llama-3-8B widths on GPU, a 1B-class model on CPU, toy
    widths for the test suite)."""
    if tiny:
        return dict(N=32, D=64, I=128, Hq=4, Hkv=2, Dh=16)
    if device.type == "cuda":
        return dict(N=4096 if quick else 16384, D=4096, I=14336, Hq=32, Hkv=8, Dh=128)
    return dict(N=512 if quick else 2048, D=2048, I=8192, Hq=16, Hkv=4, Dh=128)


def norm_cases(s: dict, device: torch.device, dtype: torch.dtype) -> list[Case]:
    N, D = s["N"], s["D"]
    es = torch.finfo(dtype).bits // 8
    hf = LlamaRMSNorm(D).to(device=device, dtype=dtype)
    hf_text, hf_image = (LlamaRMSNorm(D).to(device=device, dtype=dtype) for _ in range(2))
    modality = (torch.rand(N, device=device) < 0.5).long()

    def make():
        return torch.randn(N, D, device=device, dtype=dtype)

    def routed_where(x):
        return torch.where(modality[:, None] == 0, hf_text(x), hf_image(x))

    routed_weights = [hf_text.weight, hf_image.weight]
    return [
        Case("rms_norm", f"N={N} D={D}", make, lambda x: (x,),
             {"mmfuse": lambda x: rms_norm(x, hf.weight, hf.variance_epsilon), "transformers": hf},
             2 * N * D * es, 3 * N * D * es),
        Case("routed_rms_norm", f"N={N} D={D} E=2", make, lambda x: (x,),
             {"mmfuse": lambda x: routed_rms_norm(x, modality, routed_weights), "both+where": routed_where},
             2 * N * D * es, 3 * N * D * es),
    ]


def rope_cases(s: dict, device: torch.device, dtype: torch.dtype) -> list[Case]:
    N, Hq, Hkv, Dh = s["N"], s["Hq"], s["Hkv"], s["Dh"]
    B, L = 2, N // 2
    es = torch.finfo(dtype).bits // 8
    cos, sin = rope_cos_sin(torch.arange(L, device=device)[None], rope_frequencies(Dh, 500000.0).to(device), dtype)

    def make():
        return torch.randn(B, L, (Hq + 2 * Hkv) * Dh, device=device, dtype=dtype)

    def views(qkv):
        q = qkv[..., : Hq * Dh].view(B, L, Hq, Dh).transpose(1, 2)
        k = qkv[..., Hq * Dh: (Hq + Hkv) * Dh].view(B, L, Hkv, Dh).transpose(1, 2)
        return q, k

    qk_bytes = B * L * (Hq + Hkv) * Dh * es
    return [Case("rope", f"B={B} L={L} Hq={Hq} Hkv={Hkv} Dh={Dh}", make, views,
                 {"mmfuse": lambda q, k: apply_rope(q, k, cos, sin),
                  "transformers": lambda q, k: apply_rotary_pos_emb(q, k, cos, sin)},
                 2 * qk_bytes, 2 * qk_bytes)]


def swiglu_cases(s: dict, device: torch.device, dtype: torch.dtype) -> list[Case]:
    N, I = s["N"], s["I"]
    es = torch.finfo(dtype).bits // 8

    def make():
        return torch.randn(N, 2 * I, device=device, dtype=dtype)

    return [Case("swiglu", f"N={N} I={I}", make, lambda h: (h[:, :I], h[:, I:]),
                 {"mmfuse": swiglu, "eager": lambda g, u: F.silu(g) * u},
                 3 * N * I * es, 5 * N * I * es)]


CASE_BUILDERS: list[Callable[[dict, torch.device, torch.dtype], list[Case]]] = [norm_cases, rope_cases, swiglu_cases]


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def make_step(case: Case, mode: str, fn: Callable) -> Callable[[], object]:
    """The timed step: "fwd" (no grad), "bwd" (backward through a kept graph) or "fwd+bwd"."""
    base = case.make()
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*case.views(base))
        return step
    base.requires_grad_()
    outs = _outputs(fn(*case.views(base)))
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, base, grads, retain_graph=True)
    del outs  # fwd+bwd builds its own graph each step

    def step():
        return torch.autograd.grad(_outputs(fn(*case.views(base))), base, grads)
    return step


def measure(case: Case, mode: str, device: torch.device) -> list[dict]:
    """Every implementation of ``case`` in ``mode``, interleaved, after untimed calls on CPU."""
    steps = {name: make_step(case, mode, fn) for name, fn in case.impls.items()}
    rounds = 11 if device.type == "cpu" else 20
    nbytes = {"fwd": case.fwd_bytes, "bwd": case.bwd_bytes, "fwd+bwd": case.fwd_bytes + case.bwd_bytes}[mode]
    rows = []
    for name, measured in measure_interleaved(steps, device, rounds, warmup=settle_calls(device)).items():
        row = {"op": case.op, "shape": case.shape, "mode": mode, "impl": name, **measured}
        if "ms" in row:
            row["gbps"] = nbytes / (row["ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = _sizes(quick or tiny, device, tiny)
    rows = []
    for build in CASE_BUILDERS:
        for case in build(sizes, device, dtype):
            for mode in MODES:
                rows += measure(case, mode, device)
    add_ratio(rows, ("op", "shape", "mode"), "vs_mmfuse")
    print_table(rows, ["op", "shape", "mode", "impl", "ms", "vs_mmfuse", "peak_mib", "gbps"])
    config = dict(quick=quick or tiny, tiny=tiny, dtype=str(dtype), **sizes)
    append_results("norms", device, config, rows, out_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="fewer tokens")


if __name__ == "__main__":
    main()
