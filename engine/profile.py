"""``mmfuse profile``: a few training steps of a user's own run config under ``torch.profiler``.

Each step is timed in three phases -- data (reading, encoding images, packing), compute (forward
and backward) and optimizer -- and the compute phase's operators (their self time, from the
profiler) are grouped: attention, routed / dense GEMMs, norms / RoPE / SwiGLU / activations, losses,
other. The report gives tokens/s and images/s, peak memory, each group's share of the step, MFU
against the device's bf16 peak on a GPU (FLOPs counted by ``torch.utils.flop_counter``), and, with
``sample``, one generation through the family's pipeline split into its stages. It writes a
Chrome / Perfetto trace (``trace.json``) and the table as JSON (``profile.json``).
"""
from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path

import torch

from mmfuse.engine.atomic import atomic_file

# operator name patterns -> group, first match wins (names as torch.profiler reports them)
GROUPS = (
    ("attention", re.compile(r"mixed_attention|scaled_dot_product|flash_attention|_efficient_attention|softmax", re.I)),
    ("losses", re.compile(r"cross_entropy|cosine_loss|diffusion_loss|mse_loss|nll_loss|log_softmax|objective", re.I)),
    # before the norms: the fused gate/up projection + SwiGLU is mostly its GEMM
    ("GEMMs (routed / dense)", re.compile(r"routed_linear|routed_gate_up|routed_qkv|routed_mlp|grouped_mm|::mm\b|"
                                          r"addmm|bmm|matmul|::linear|conv", re.I)),
    ("norms / RoPE / SwiGLU", re.compile(r"rms_norm|layer_norm|group_norm|rope|swiglu|silu|gelu|sigmoid|rsqrt", re.I)),
)
PHASES = ("data", "compute", "optimizer")
# bf16 dense peaks (TFLOP/s), matched in order against torch.cuda.get_device_name
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def device_peak(table: tuple[tuple[str, float], ...], device: torch.device) -> float | None:
    """The first value of ``table`` whose key is in the CUDA device's name; None on CPU or if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in table if key in name), None)


def group_of(op_name: str) -> str:
    return next((group for group, pattern in GROUPS if pattern.search(op_name)), "other")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_run(config_path: str | Path, steps: int = 3, sample: bool = False, out: str | Path | None = None,
                device: str | torch.device = "cpu") -> dict:
    """Profile ``steps`` optimizer steps (after one warm-up step) of the run config; returns the report."""
    from mmfuse.engine.config import load_run_config
    from mmfuse.engine.run import batch_stream, resolve_device, set_up
    from mmfuse.engine.train import make_optimizer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = resolve_device(str(device))
    cfg = load_run_config(config_path)
    out = Path(out) if out is not None else Path(config_path).resolve().parent / "profile"
    run = set_up(cfg, device)
    stream = batch_stream(run)
    model, spec = run.model, run.spec
    model.train()
    optimizer = make_optimizer(model, cfg.train)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    phases = {p: 0.0 for p in PHASES}
    counts: dict[str, int] = {}

    def step(index: int, record: bool) -> None:
        t0 = time.perf_counter()
        batch = stream(index, 0)
        _sync(device)
        t1 = time.perf_counter()
        with torch.profiler.record_function("mmfuse.compute"):
            objective = spec.loss(model, batch, generator)
            objective.total.backward()
        _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        if record:
            for phase, ms in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
                phases[phase] += ms * 1e3
            for name, n in spec.count(batch).items():
                counts[name] = counts.get(name, 0) + n

    try:
        step(0, record=False)  # warm-up: first-call costs stay out of the figures
        flops = _step_flops(lambda: step(1, record=False)) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(steps):
                step(2 + i, record=True)
    finally:
        stream.close()
    report = _report(prof, phases, counts, steps, device, flops)
    if sample:
        report["sample"] = _sample(run)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "trace.json") as tmp:
        prof.export_chrome_trace(str(tmp))
    with atomic_file(out / "profile.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    report["files"] = {"trace": str(out / "trace.json"), "table": str(out / "profile.json")}
    return report


def _step_flops(one_step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step()
    return float(counter.get_total_flops())


def _report(prof, phases: dict, counts: dict, steps: int, device: torch.device, flops: float | None) -> dict:
    """Per-step milliseconds by group: the data and optimizer phases as timed, the compute phase split
    by its operators' self time (what the profiler cannot attribute to an operator is "other")."""
    use_device = device.type == "cuda"
    by_group: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith(("mmfuse.", "Optimizer.", "ProfilerStep", "enumerate(DataLoader")):
            continue  # ranges, not operators
        self_us = event.self_device_time_total if use_device else event.self_cpu_time_total
        if self_us <= 0 or re.search(r"_foreach_|adam", event.key, re.I):
            continue  # the optimizer's operators: timed as their phase
        by_group[group_of(event.key)] = by_group.get(group_of(event.key), 0.0) + self_us / 1e3
    compute = phases["compute"]
    attributed = sum(by_group.values())
    scale = min(1.0, compute / attributed) if attributed else 0.0  # op self times never exceed the phase
    table = {group: ms * scale / steps for group, ms in by_group.items()}
    table["other"] = table.get("other", 0.0) + max(0.0, compute - attributed * scale) / steps
    table["optimizer"] = phases["optimizer"] / steps
    table["data loading and packing"] = phases["data"] / steps
    step_ms = sum(phases.values()) / steps
    order = [g for g, _ in GROUPS] + ["other", "optimizer", "data loading and packing"]
    rows = [{"group": g, "ms_per_step": table.get(g, 0.0), "share": table.get(g, 0.0) / step_ms if step_ms else 0.0}
            for g in order]
    seconds = step_ms * steps / 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if use_device else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tflops = device_peak(PEAK_BF16_TFLOPS, device)
    return {
        "device": torch.cuda.get_device_name(device) if use_device else "cpu",
        "steps": steps,
        "step_ms": step_ms,
        "tokens_per_s": counts.get("tokens", 0) / seconds if seconds else 0.0,
        "images_per_s": counts.get("images", 0) / seconds if seconds else 0.0,
        "peak_memory_mib": peak,
        "peak_memory_kind": "max allocated on the device" if use_device else "peak RSS of the process",
        "mfu": flops / (step_ms / 1e3) / (tflops * 1e12) if flops and tflops else None,
        "groups": rows,
    }


def _sample(run) -> dict:
    """One generation through the family's pipeline (random weights or not: the cost is the same)."""
    pipe = run.pipeline()
    hooks = run.spec.pipeline
    timings: dict = {}
    t0 = time.perf_counter()
    pipe(prompt_ids=[[1, 2, 3]], num_inference_steps=min(4, hooks.num_inference_steps), output_type="latent",
         timings=timings, progress=False, seed=0)
    return {"ms": (time.perf_counter() - t0) * 1e3, **timings}


def format_report(report: dict) -> str:
    lines = [f"device {report['device']}: {report['steps']} steps, {report['step_ms']:.1f} ms a step, "
             f"{report['tokens_per_s']:.0f} tokens/s, {report['images_per_s']:.1f} images/s, peak memory "
             f"{report['peak_memory_mib']:.0f} MiB ({report['peak_memory_kind']})"
             + (f", MFU {report['mfu']:.1%}" if report.get("mfu") is not None else ""),
             f"{'group':<26} {'ms / step':>10} {'share':>7}"]
    lines += [f"{r['group']:<26} {r['ms_per_step']:>10.2f} {r['share']:>7.1%}" for r in report["groups"]]
    if "sample" in report:
        s = report["sample"]
        stages = ", ".join(f"{k.removesuffix('_ms')} {v:.0f} ms" for k, v in s.items() if k.endswith("_ms"))
        lines.append(f"one image through the pipeline: {s['ms']:.0f} ms ({stages})")
    if "files" in report:
        lines.append(f"wrote {report['files']['trace']} (chrome://tracing, ui.perfetto.dev) and {report['files']['table']}")
    return "\n".join(lines)
