"""pytest-benchmark wrappers of the kernel micro-benchmarks: mmfuse vs the eager baseline, small sizes.

    pytest bench/ --benchmark-only            # or: --benchmark-group-by=group --benchmark-columns=median

Not part of the test suite (pytest.ini's testpaths is tests/). The folder has no __init__.py on
purpose: bench/ is the package mmfuse.bench, which a bare `bench` import must not load (see
bench/__init__.py). Each case reuses its bench module's builders and timed step, so these time exactly
what ``mmfuse bench`` times, at small sizes (milliseconds a call on a CPU); one benchmark group per
case, one benchmark per implementation (70 in all; ``--benchmark-max-time=0.2`` shortens the run).
"""
from __future__ import annotations

import pytest
import torch

from mmfuse.bench import bench_attention, bench_linear_ce, bench_losses, bench_norms, bench_routed
from mmfuse.kernels.routed_linear import build_routing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("impl", ["mmfuse", "sdpa_dense_mask"])
@pytest.mark.parametrize("mode", bench_attention.MODES)
@pytest.mark.parametrize("seq_len", [256, 512])
def test_mixed_attention(benchmark, seq_len, mode, impl):
    _seed()
    kv_start, kv_end = bench_attention.packed_layout(1, seq_len, image_tokens=64, doc_len=256, device=DEVICE)
    q = torch.randn(1, 4, seq_len, 64, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(1, 2, seq_len, 64, device=DEVICE, dtype=DTYPE) for _ in range(2))
    fn = bench_attention.implementations(q, kv_start, kv_end, DEVICE, mask_bytes_ok=True)[impl]
    benchmark.group = f"mixed_attention packed L={seq_len} {mode}"
    benchmark(bench_attention.make_step(fn, q, k, v, mode))


@pytest.mark.parametrize("impl", bench_routed.IMPLS)
@pytest.mark.parametrize("mode", bench_routed.MODES)
@pytest.mark.parametrize("layer", ["mlp", "qkv"])  # routed_swiglu_mlp, routed_qkv_projection (routed_linear)
def test_routed(benchmark, layer, mode, impl):
    _seed()
    n, d, inter, heads = 512, 128, 352, 4
    layers = bench_routed.make_layers(d, inter, DEVICE, DTYPE)
    x = torch.randn(n, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    m = (torch.rand(n, device=DEVICE) >= 0.5).long()
    fn = bench_routed.implementations(layer, layers[layer], heads)[impl]
    benchmark.group = f"routed {layer} 50/50 {mode}"
    benchmark(bench_routed.make_step(fn, x, m, build_routing(m, 2), layers[layer]["weights"], mode))


NORM_SIZES = dict(N=256, D=1024, I=2048, Hq=8, Hkv=2, Dh=128)


@pytest.mark.parametrize("impl", ["mmfuse", "baseline"])
@pytest.mark.parametrize("mode", bench_norms.MODES)
@pytest.mark.parametrize("op", ["rms_norm", "routed_rms_norm", "rope", "swiglu"])
def test_norms_rope_swiglu(benchmark, op, mode, impl):
    _seed()
    case = next(c for build in bench_norms.CASE_BUILDERS for c in build(NORM_SIZES, DEVICE, DTYPE) if c.op == op)
    name = impl if impl == "mmfuse" else next(n for n in case.impls if n != "mmfuse")  # transformers / eager
    benchmark.group = f"{op} {case.shape} {mode}"
    benchmark.extra_info["impl"] = name
    benchmark(bench_norms.make_step(case, mode, case.impls[name]))


@pytest.mark.parametrize("impl", ["mmfuse", "eager"])
@pytest.mark.parametrize("loss", ["cosine", "diffusion", "ddpm_v_pair"])
def test_losses(benchmark, loss, impl):
    _seed()
    builders = {"cosine": bench_losses.cosine_cases, "diffusion": bench_losses.diffusion_cases,
                "ddpm_v_pair": bench_losses.pair_cases}
    case = builders[loss](True, DEVICE, DTYPE)[0]
    benchmark.group = f"{loss} {case.shape} {case.mode}"
    benchmark(bench_losses.make_step(case, case.impls[impl]))


@pytest.mark.parametrize("impl", ["mmfuse", "eager"])
@pytest.mark.parametrize("mode", bench_linear_ce.MODES)
def test_linear_cross_entropy(benchmark, mode, impl):
    _seed()
    n, d, v = 256, 128, 8192
    hidden = torch.randn(n, d, device=DEVICE, dtype=DTYPE)
    weight = (torch.randn(v, d, device=DEVICE) * d**-0.5).to(DTYPE)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    fn = bench_linear_ce.implementations(DEVICE)[impl]
    benchmark.group = f"linear_cross_entropy N={n} D={d} V={v} {mode}"
    benchmark(bench_linear_ce.make_step(fn, hidden, weight, labels, mode))
