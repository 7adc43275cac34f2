"""Modality-routed layers (LlamaFusion) vs the routings users would otherwise write, in one process.

Two layers: the routed SwiGLU MLP (``routed_swiglu_mlp``: gate/up D -> 2I, down I -> D) and a routed
fused QKV projection (``routed_qkv_projection``: D -> 3D). Two experts, text (0, frozen) and image
(1, trainable), as LlamaFusion trains them; x requires grad (earlier layers train).

Implementations of each layer:

* ``mmfuse``: the routed layer (Triton on CUDA, the torch backend on CPU); the batch's routing is
  built once outside the timed step, as a model builds it once for all its layers (its own cost is
  the ``build_routing`` row).
* ``dense``: ONE expert over all tokens, the speed of light (same FLOPs as an ideal routed layer).
* ``where``: both experts over all tokens, then ``torch.where`` (public reimplementations; 2x FLOPs).
* ``gather``: per expert, boolean-mask gather of its tokens, the expert, ``index_put`` back.

Splits: text/image token fractions 50/50 and 90/10, each token's modality drawn independently.
Modes: "fwd" (no grad), "bwd" (backward through a kept graph) and "fwd+bwd". On CUDA, ``tflops``
counts only an ideal routed layer's work (each token through its own expert; weight gradients for
the trainable expert only), the same for every row.
The implementations of one case are timed in interleaved rounds (each round runs each once), and
each row reports the median over rounds, so load from other processes falls on all of them alike.
``vs_mmfuse`` is an implementation's time over mmfuse's (> 1: mmfuse faster); ``peak_mib`` the extra
memory at the step's peak.

    python -m mmfuse.bench.bench_routed [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmfuse.bench.common import (add_ratio, append_results, bench_main, measure_interleaved, print_table,
                                 settle_calls, time_ms)
from mmfuse.kernels.routed_linear import build_routing
from mmfuse.kernels.routed_mlp import routed_qkv_projection, routed_swiglu_mlp

MODES = ("fwd", "bwd", "fwd+bwd")
SPLITS = (0.5, 0.9)  # fraction of text tokens
IMPLS = ("mmfuse", "dense", "where", "gather")


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def qkv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def make_layers(d: int, inter: int, device, dtype) -> dict[str, dict]:
    """Per layer kind: the expert weights ([text, image] per weight name) and the dense expert function."""
    def experts(shape):
        ws = [(torch.randn(shape, device=device) * shape[1] ** -0.5).to(dtype) for _ in range(2)]
        ws[1].requires_grad_()  # text frozen, image trainable
        return ws

    return {
        "mlp": {"weights": [experts((2 * inter, d)), experts((d, inter))], "expert": swiglu},
        "qkv": {"weights": [experts((3 * d, d))], "expert": qkv},
    }


def implementations(kind: str, layer: dict, heads: int) -> dict[str, Callable]:
    weights, expert = layer["weights"], layer["expert"]

    def of(e):
        return [w[e] for w in weights]

    def ours(x, m, routing):
        if kind == "mlp":
            return routed_swiglu_mlp(x, m, *weights, routing=routing)
        q, k, v = routed_qkv_projection(x, m, weights[0], num_heads=heads, num_kv_heads=heads, routing=routing)
        return q  # views of one output: backward through q reaches the whole GEMM

    def where(x, m, routing):
        return torch.where((m == 1)[:, None], expert(x, *of(1)), expert(x, *of(0)))

    def gather(x, m, routing):
        y = None
        for e in range(2):
            mask = m == e
            y_e = expert(x[mask], *of(e))
            y = x.new_zeros((x.shape[0], y_e.shape[-1])) if y is None else y
            y = y.index_put((mask,), y_e)
        return y

    return {"mmfuse": ours, "dense": lambda x, m, routing: expert(x, *of(1)), "where": where, "gather": gather}


def make_step(fn: Callable, x, m, routing, weights, mode: str) -> Callable[[], object]:
    """The timed step: "fwd" (no grad), "bwd" (backward through a kept graph) or "fwd+bwd"."""
    trainable = [x] + [w[1] for w in weights]
    if mode == "bwd":
        kept: list[torch.Tensor] = []  # the forward graph, built on the first (untimed, warm-up) call

        def backward():
            if not kept:
                kept.append(fn(x, m, routing))
            return torch.autograd.grad(kept[0], trainable, torch.ones_like(kept[0]), retain_graph=True)

        return backward

    def step():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            y = fn(x, m, routing)
            if mode == "fwd+bwd":
                torch.autograd.grad(y, trainable, torch.ones_like(y))
            return y

    return step


def useful_flops(kind: str, n: int, n_trainable: int, d: int, inter: int, mode: str) -> int:
    """FLOPs of an ideal routed layer: each token through its own expert once; the backward computes
    dx for every token and dW only for the trainable (image) expert's tokens. Implementations that
    run both experts do more work than this and get no credit for it."""
    gemms = [(2 * inter, d), (d, inter)] if kind == "mlp" else [(3 * d, d)]
    fwd = sum(2 * n * dout * din for dout, din in gemms)
    bwd = fwd + sum(2 * n_trainable * dout * din for dout, din in gemms)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def sizes(quick: bool, device: torch.device, tiny: bool = False) -> tuple[torch.dtype, int, int, int, int]:
    """(dtype, N tokens, D hidden, I intermediate, heads): Llama-ish widths (toy ones when ``tiny``)."""
    if tiny:
        return torch.float32, 64, 32, 64, 2
    if device.type == "cuda":
        return (torch.bfloat16, 4096, 2048, 5632, 16) if quick else (torch.bfloat16, 16384, 4096, 14336, 32)
    return (torch.float32, 512, 256, 704, 4) if quick else (torch.float32, 2048, 1024, 2816, 16)


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    dtype, n, d, inter, heads = sizes(quick or tiny, device, tiny)
    reps = (2 if tiny else 7) if device.type == "cpu" else 20  # interleaved rounds (GPU: each a do_bench median)
    layers = make_layers(d, inter, device, dtype)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for text_fraction in SPLITS:
        split = f"{round(100 * text_fraction)}/{round(100 * (1 - text_fraction))}"
        # Modality drawn per token: the worst layout for routing (nearly every token out of place, so
        # the gather and un-sort move every row); a packed batch's image spans are kinder.
        m = (torch.rand(n, device=device) >= text_fraction).long()
        build = time_ms(lambda: build_routing(m, 2), device, warmup=1, reps=reps)
        rows.append({"layer": "-", "split": split, "mode": "-", "impl": "build_routing", **build})
        routing = build_routing(m, 2)
        n_image = int(m.sum())
        for kind, layer in layers.items():
            for mode in MODES:
                steps = {name: make_step(fn, x, m, routing, layer["weights"], mode)
                         for name, fn in implementations(kind, layer, heads).items()}
                flops = useful_flops(kind, n, n_image, d, inter, mode)
                for name, measured in measure_interleaved(steps, device, reps, warmup=settle_calls(device)).items():
                    row = {"layer": kind, "split": split, "mode": mode, "impl": name, "N": n, "D": d,
                           "I": inter if kind == "mlp" else None, "dtype": str(dtype).removeprefix("torch."),
                           **measured}
                    if device.type == "cuda" and row.get("ms"):
                        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    rows.append(row)
                    print(f"  {kind} {split} {mode:8s} {name:7s}: {row.get('ms', '-')} ms, "
                          f"{row.get('peak_mib', '-')} MiB")
    _add_ratios(rows)
    print_table(rows, ["layer", "split", "mode", "impl", "ms", "ms_min", "vs_mmfuse", "vs_mmfuse_min", "vs_dense",
                       "peak_mib", "tflops", "error"])
    config = dict(quick=quick or tiny, tiny=tiny, dtype=str(dtype), N=n, D=d, I=inter, heads=heads, reps=reps,
                  backend="triton" if device.type == "cuda" else "torch", frozen="text expert (0)")
    append_results("routed", device, config, rows, out_dir)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """``vs_mmfuse``: time over mmfuse's (> 1: mmfuse faster; ``_min``: of the fastest rounds);
    ``vs_dense``: time over one dense layer's."""
    case = ("layer", "split", "mode")
    add_ratio(rows, case, "vs_mmfuse")
    add_ratio(rows, case, "vs_mmfuse_min", value="ms_min")  # best rounds: robust on a shared machine
    add_ratio(rows, case, "vs_dense", reference="dense")


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="small widths and few tokens")


if __name__ == "__main__":
    main()
