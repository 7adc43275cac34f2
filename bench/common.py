"""What every benchmark shares: timing, peak memory, and the results file.

* GPU: ``triton.testing.do_bench`` medians, peak memory from the CUDA caching allocator.
* CPU: medians of ``time.perf_counter`` after warm-up; peak memory as the rise of the process's peak
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each measurement).
* Results append to ``bench/results/<name>.json`` as a list of runs, each with the device, the
  torch/triton versions, the git sha and every row, so runs on different machines sit side by side.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, reps: int = 5) -> dict[str, float]:
    """Median and spread (min, max) of ``fn``'s wall time in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, quantiles=[0.5, 0.0, 1.0], return_mode="median")
        return {"ms": q[0], "ms_min": q[1], "ms_max": q[2]}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def copy_bandwidth_gbps(device: torch.device | str, mib: int | None = None) -> float:
    """The device's achievable memory bandwidth: GB/s of ``dst.copy_(src)``, counting read + write.

    The ceiling a memory-bound kernel is held against (its ``gbps`` over this), measured in the same
    run rather than taken from a spec sheet. Default buffer: 1 GiB on CUDA (well past L2), 64 MiB on CPU.
    """
    device = torch.device(device)
    mib = mib or (1024 if device.type == "cuda" else 64)
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, reps=7)["ms"]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def add_ratio(rows: list[dict], case: Sequence[str], name: str, reference: str | tuple[str, ...] = "mmfuse",
              value: str = "ms") -> None:
    """``row[name] = row[value] / the reference implementation's value on the same case``.

    ``case`` names the fields that identify a case; ``reference`` is the ``impl`` (or impls) measured
    against. A row without ``value``, or whose case has no reference value, gets no ``name``.
    ``add_ratio(rows, fields, "vs_mmfuse")`` gives the baseline time over mmfuse's (> 1: mmfuse faster).
    """
    references = (reference,) if isinstance(reference, str) else reference

    def key(r: dict) -> tuple:
        return tuple(r.get(f) for f in case)

    base = {key(r): r.get(value) for r in rows if r["impl"] in references}
    for r in rows:
        ref = base.get(key(r))
        if r.get(value) is not None and ref:
            r[name] = r[value] / ref


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS, so that reusing them counts as new resident memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the figure may then undercount reuse of freed memory


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Extra memory ``fn`` needs at its peak, above what was held before it ran (MiB)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _proc_status_kib("VmRSS")
        fn()
        return (_proc_status_kib("VmHWM") - base) / 1024
    except OSError:
        return None  # not Linux, or /proc not writable: report no figure rather than a wrong one


# Untimed calls before each timed one of a millisecond step on CPU (``measure_interleaved(warmup=)``):
# the two calls right after another implementation's large allocations run up to 2x slow (measured:
# cosine_loss right after the eager form, 4.9 vs 2.4 ms). A GPU's do_bench warms up itself.
CPU_SETTLE_CALLS = 2


def settle_calls(device: torch.device) -> int:
    """:data:`CPU_SETTLE_CALLS` on CPU, 0 elsewhere."""
    return CPU_SETTLE_CALLS if device.type == "cpu" else 0


def measure_interleaved(steps: dict[str, Callable], device, rounds: int, warmup: int = 0) -> dict[str, dict]:
    """Per implementation: peak memory, then the median (and min, max) over rounds that each time every
    implementation once in turn, so that load from other processes drifts over all of them alike.
    ``warmup`` untimed calls precede each timed one (see :data:`CPU_SETTLE_CALLS`)."""
    rows: dict[str, dict] = {}
    for name, step in steps.items():
        try:
            step()
            sync(device)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run this size (e.g. out of memory)
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
            continue
        # Memory first: after the timing loop a CPU allocator may serve the next run from freed pages.
        rows[name] = {"peak_mib": peak_memory_mib(step, device)}
    live = [name for name in steps if "error" not in rows[name]]
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(rounds):
        for name in live:
            times[name].append(time_ms(steps[name], device, warmup=warmup, reps=1)["ms"])
    for name in live:
        rows[name].update(ms=statistics.median(times[name]), ms_min=min(times[name]), ms_max=max(times[name]))
    return rows


def freeze_imports() -> None:
    """Move every object alive now (the imports: torch, transformers, ...) out of the garbage
    collector's sight: each peak-memory measurement starts with ``gc.collect()``, which otherwise
    walks them all (about half a second with transformers imported). Garbage made later is still
    collected; ``gc.unfreeze()`` undoes it."""
    gc.collect()  # so that no garbage is frozen with them
    gc.freeze()


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_metadata(device: torch.device | str) -> dict:
    import triton

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": git_sha(),
    }


def append_results(name: str, device: torch.device | str, config: dict, rows: list[dict],
                   out_dir: Path | str | None = None) -> Path:
    """Append one run (metadata, config, rows) to ``<out_dir>/<name>.json`` and return the path."""
    path = Path(out_dir or RESULTS_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({**run_metadata(device), "config": config, "rows": rows})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves a half-written results file
    print(f"appended to {path}")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table (missing cells blank, floats to 4 significant digits)."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def bench_main(run: Callable[[bool, torch.device, str | None], object], description: str | None,
               argv: list[str] | None = None, quick_help: str = "fewer sizes") -> None:
    """The command line every ``bench/bench_*.py`` shares: ``[--quick] [--device D] [--out DIR] [--threads N]``."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default torch's); 1 keeps timings steady on a shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    freeze_imports()
    run(args.quick, torch.device(args.device), args.out)
