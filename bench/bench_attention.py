"""mixed_attention vs the attention users would otherwise run, side by side in one process.

Baselines: SDPA with a dense (B, 1, L, L) bool mask, FlexAttention with the same mask as a block
mask (where it runs: compiled on GPU, eager on CPU), and flash-attn with a plain causal mask where
installed (a speed-of-light reference: it cannot express image spans). Modes: fwd, bwd (backward
through a kept graph), fwd+bwd. GPU rows carry TFLOP/s counting only unmasked query/key pairs; the
memory-bound extend/decode rows carry GB/s; every row carries ms and peak memory.
The tile figure is the fraction of (query-block, key-block) tiles mmfuse computes vs a dense kernel.

    python -m mmfuse.bench.bench_attention [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmfuse.bench.common import add_ratio, append_results, bench_main, peak_memory_mib, print_table, sync, time_ms
from mmfuse.kernels import dense_mask, mask_intervals, mixed_attention, tile_stats

MODES = ("fwd", "bwd", "fwd+bwd")


def packed_layout(batch: int, seq_len: int, image_tokens: int, doc_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of packed documents, each ``text, image, text`` — Transfusion's training layout."""
    span = torch.zeros(batch, seq_len, dtype=torch.long)
    doc = torch.zeros(batch, seq_len, dtype=torch.long)
    span_id = 1
    for start in range(0, seq_len, doc_len):
        end = min(seq_len, start + doc_len)
        doc[:, start:end] = start // doc_len
        img0 = start + (end - start) // 4
        img1 = min(end, img0 + image_tokens)
        span[:, img0:img1] = span_id
        span_id += 1
    kv_start, kv_end = mask_intervals(span, doc)
    return kv_start.to(device), kv_end.to(device)


def unmasked_pairs(kv_start: torch.Tensor, kv_end: torch.Tensor) -> int:
    return int((kv_end - kv_start).clamp(min=0).sum())


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def _flex_fn(q, kv_start, kv_end, device, compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s, e = kv_start, kv_end

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= s[b, q_idx]) & (kv_idx < e[b, q_idx])

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], q.shape[2], device=str(device))
    attn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return lambda q, k, v: attn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _flash_causal():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    # flash-attn wants (B, L, H, D); transposes are views, so the comparison stays about attention.
    return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           causal=True).transpose(1, 2)


def implementations(q, kv_start, kv_end, device, mask_bytes_ok: bool) -> dict[str, Callable | str]:
    """name -> attention callable (q, k, v) -> out, or a string saying why it cannot run here."""
    impls: dict[str, Callable | str] = {
        "mmfuse": lambda q, k, v: mixed_attention(q, k, v, kv_start, kv_end),
    }
    if q.shape[2] == kv_start.shape[1] and mask_bytes_ok:
        mask = dense_mask(kv_start, kv_end, q.shape[2])[:, None]
        impls["sdpa_dense_mask"] = lambda q, k, v: _sdpa(q, k, v, mask)
    else:
        impls["sdpa_dense_mask"] = "mask too large"
    try:
        impls["flex_attention"] = _flex_fn(q, kv_start, kv_end, device, compiled=device.type == "cuda")
    except Exception as exc:  # noqa: BLE001 - any failure means "does not run here", recorded as such
        impls["flex_attention"] = f"unavailable: {type(exc).__name__}"
    flash = _flash_causal() if device.type == "cuda" else None
    impls["flash_attn_causal"] = flash or "flash-attn not installed"
    return impls


def make_step(fn: Callable, q, k, v, mode: str) -> Callable[[], object]:
    """The timed step of one mode: "fwd" (no grad), "bwd" (backward through a kept graph) or
    "fwd+bwd" (forward and backward), on fresh leaf copies of q, k, v."""
    leaves = [t.detach().requires_grad_(mode != "fwd") for t in (q, k, v)]

    def fwd():
        with torch.set_grad_enabled(mode != "fwd"):
            return fn(*leaves)

    if mode == "fwd":
        return fwd
    out = fwd()
    grad_out = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fwd(), leaves, grad_out)


def measure(name, fn, q, k, v, mode, device, useful_flops, nbytes: int = 0) -> dict:
    """One row: ms (median, min, max), peak extra memory; on CUDA TFLOP/s over the unmasked work;
    ``gbps`` when ``nbytes`` (the minimum traffic of a memory-bound case) is given."""
    row = {"impl": name, "mode": mode}
    try:
        step = make_step(fn, q, k, v, mode)
        step()
        sync(device)
    except Exception as exc:  # noqa: BLE001 - e.g. FlexAttention has no backward on CPU
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        return row
    row.update(time_ms(step, device))
    row["peak_mib"] = peak_memory_mib(step, device)
    if device.type == "cuda":
        factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]  # FlashAttention's FLOP convention
        row["tflops"] = useful_flops * factor / (row["ms"] * 1e-3) / 1e12
    if nbytes:
        row["gbps"] = nbytes / (row["ms"] * 1e-3) / 1e9
    return row


def sizes(quick: bool, device: torch.device, tiny: bool = False) -> dict:
    """Shapes and lengths: Llama-ish GQA heads in bf16 on GPU, a small fp32 problem on CPU, toy ones
    for the test suite (``tiny``)."""
    if tiny:
        return dict(dtype=torch.float32, batch=1, heads=2, kv_heads=1, head_dim=32, lengths=[128],
                    image_tokens=32, doc_len=64, prefixes=[64], chunk=32)
    if device.type == "cuda":
        return dict(dtype=torch.bfloat16, batch=4, heads=16, kv_heads=4, head_dim=128,
                    lengths=[1024, 4096] if quick else [1024, 2048, 4096, 8192], image_tokens=256, doc_len=1024,
                    prefixes=[256, 2048] if quick else [256, 1024, 4096], chunk=256)
    # quick keeps all three CPU lengths (about 5 s for the longest): tile skipping pays off with length,
    # and the throughput-vs-length plot needs more than two points.
    return dict(dtype=torch.float32, batch=1, heads=4, kv_heads=2, head_dim=64,
                lengths=[512, 1024, 2048], image_tokens=256, doc_len=1024,
                prefixes=[256, 2048] if quick else [256, 1024, 4096], chunk=256)


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    s = sizes(quick or tiny, device, tiny)
    dtype, batch, heads, kv_heads, head_dim = s["dtype"], s["batch"], s["heads"], s["kv_heads"], s["head_dim"]
    rows = []
    for seq_len in s["lengths"]:
        kv_start, kv_end = packed_layout(batch, seq_len, s["image_tokens"], s["doc_len"], device=device)
        q = torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, seq_len, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        tiles = tile_stats(kv_start.cpu(), kv_end.cpu(), seq_len, head_dim=head_dim, dtype=dtype,
                           **({} if device.type == "cuda" else {"block_m": 128, "block_n": 64}))
        flops = 4 * head_dim * heads * unmasked_pairs(kv_start, kv_end)
        mask_ok = batch * seq_len * seq_len <= 2**31
        for name, fn in implementations(q, kv_start, kv_end, device, mask_ok).items():
            for mode in MODES:
                if isinstance(fn, str):
                    row = {"impl": name, "mode": mode, "error": fn}
                else:
                    row = measure(name, fn, q, k, v, mode, device, flops)
                row.update(seq_len=seq_len, batch=batch, case="train_packed",
                           tiles_computed_vs_dense=tiles["needed"] / tiles["dense"],
                           tiles_full_vs_computed=tiles["full"] / tiles["needed"])
                rows.append(row)
    rows += extend_and_decode(s, device)
    add_ratio(rows, ("case", "seq_len", "mode"), "vs_mmfuse")
    print_table(rows, ["case", "seq_len", "mode", "impl", "ms", "vs_mmfuse", "peak_mib", "tflops", "gbps", "error"])
    config = dict(quick=quick or tiny, tiny=tiny, dtype=str(dtype), heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, batch=batch)
    append_results("attention", device, config, rows, out_dir)
    return rows


def extend_and_decode(s: dict, device) -> list[dict]:
    """Diffusion-sampling extend (image chunk vs cached prefix) and one-token decode, forward only;
    both read the whole cache, so they carry GB/s (q, k, v read once, o written once)."""
    dtype, heads, kv_heads, head_dim = s["dtype"], s["heads"], s["kv_heads"], s["head_dim"]
    rows = []
    for prefix in s["prefixes"]:
        for case, lq in (("extend_image_chunk", s["chunk"]), ("decode", 1)):
            lk = prefix + lq
            q = torch.randn(1, heads, lq, head_dim, device=device, dtype=dtype)
            k = torch.randn(1, kv_heads, lk, head_dim, device=device, dtype=dtype)
            v = torch.randn_like(k)
            kv_start = torch.zeros(1, lq, device=device, dtype=torch.int32)
            kv_end = torch.full((1, lq), lk, device=device, dtype=torch.int32)
            flops = 4 * head_dim * heads * lq * lk
            nbytes = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
            full = torch.ones(1, 1, lq, lk, device=device, dtype=torch.bool)
            impls = {"mmfuse": lambda q, k, v: mixed_attention(q, k, v, kv_start, kv_end),
                     "sdpa_dense_mask": lambda q, k, v: _sdpa(q, k, v, full)}
            for name, fn in impls.items():
                row = measure(name, fn, q, k, v, "fwd", device, flops, nbytes)
                row.update(case=case, seq_len=lk, batch=1)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="fewer sizes")


if __name__ == "__main__":
    main()
