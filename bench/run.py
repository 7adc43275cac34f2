"""mmfuse bench: every benchmark side by side with the baselines users would otherwise run.

    mmfuse bench [run] [--quick] [--only NAMES] [--device D] [--out DIR] [--threads N]
    mmfuse bench plot [--results DIR] [--out DIR]
    mmfuse bench report [--results DIR] [--readme README.md]

run (the default) runs the modules in this order: attention, routed, norms, losses,
linear_cross_entropy (kernels: fwd, bwd, fwd+bwd), training (three families vs plain PyTorch),
sampling (decode vs transformers generate; image sampling with a cached vs recomputed prefix; prompt
-> pixels per family), patch (patched vs unpatched transformers Llama), startup (the command line's
start-up time against a 3 s budget). Each appends one run (device, versions, git sha, config,
median / min / max per row) to DIR/<name>.json (default bench/results); then SUMMARY.md and the plots
are redrawn from DIR and, for bench/results itself, the README's performance section is rewritten.
A module that is not installed is skipped; one that fails is reported, the others still run, and the
command exits non-zero. --quick is the README's size (about 1.5 minutes on 2 CPU cores).

plot draws throughput vs sequence length, latency vs prompt length and peak memory per device into
DIR (default RESULTS/plots); report writes RESULTS/SUMMARY.md and, with --readme, the text between
the README's <!-- perf:begin --> and <!-- perf:end --> markers.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from mmfuse.bench.common import RESULTS_DIR, freeze_imports

# result name -> module (file) under mmfuse.bench, in run order: kernels, then end to end.
REGISTRY: dict[str, str] = {
    "attention": "bench_attention",
    "routed": "bench_routed",
    "norms": "bench_norms",
    "losses": "bench_losses",
    "linear_cross_entropy": "bench_linear_ce",
    "training": "bench_training",
    "sampling": "bench_sampling",
    "patch": "bench_patch",
    "startup": "bench_startup",
}
KERNEL_MODULES = ("attention", "routed", "norms", "losses", "linear_cross_entropy")
README = Path(__file__).resolve().parents[1] / "README.md"  # present in a source checkout only


@dataclass
class Section:
    """What happened to one module: ``status`` is "ok", "failed" or "not available"."""

    name: str
    status: str
    seconds: float = 0.0
    rows: int = 0
    detail: str = ""


def parse_only(text: str | None) -> list[str]:
    """``--only`` value (comma-separated module names) -> names in registry order; None: all of them."""
    if text is None:
        return list(REGISTRY)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        what = f"unknown benchmark module(s) {', '.join(map(repr, unknown))}" if unknown else "no module given"
        raise ValueError(f"{what}; choose from {', '.join(REGISTRY)} (comma-separated)")
    return [n for n in REGISTRY if n in names]


def resolve_device(text: str | None) -> torch.device:
    """``--device`` value -> device; None: CUDA when present, else CPU. Asking for CUDA without it is
    an error, not a silent CPU run."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device {text!r} is not a device name; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {text!r}: the benchmarks run on cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {text!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load(name: str) -> Callable | None:
    """The module's ``run`` function; None when its file is not in this installation."""
    module_name = f"mmfuse.bench.{REGISTRY[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the file is there but needs a package that is not: a failure, not a skip
        return None
    run = getattr(module, "run", None)
    if not callable(run) or "tiny" not in inspect.signature(run).parameters:
        raise TypeError(f"{module_name}.run must be run(quick, device, out_dir, tiny=False)")
    return run


@contextlib.contextmanager
def bench_process(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` CPU threads (None: torch's default), the objects frozen before each module
    (torch, transformers, ...: see ``common.freeze_imports``) out of the garbage collector's sight; restores both.

    Every peak-memory measurement starts with ``gc.collect()``; over the hundreds of thousands of
    objects the imports leave behind that takes about half a second, more than most steps it frames.
    Frozen objects are never collected; garbage made after the freeze still is.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        gc.unfreeze()


def run_section(name: str, quick: bool, device: torch.device, out_dir: Path, tiny: bool) -> Section:
    start = time.perf_counter()
    try:
        run = load(name)
        if run is None:
            detail = f"bench/{REGISTRY[name]}.py is not in this installation"
            print(f"{name}: not available ({detail}); skipped")
            return Section(name, "not available", detail=detail)
        freeze_imports()  # after the module's imports (transformers, diffusers, ...)
        torch.manual_seed(0)
        rows = run(quick or tiny, device, str(out_dir), tiny=tiny)
    except Exception as exc:  # noqa: BLE001 - one module's failure must not lose the others' results
        traceback.print_exc()
        message = (str(exc).splitlines() or [""])[0][:160]
        return Section(name, "failed", time.perf_counter() - start, detail=f"{type(exc).__name__}: {message}")
    return Section(name, "ok", time.perf_counter() - start, rows=len(rows or []))


def print_summary(sections: list[Section], seconds: float, out_dir: Path) -> None:
    print(f"\n== {len(sections)} section(s) in {seconds:.1f} s ==")
    width = max(len(s.name) for s in sections)
    for s in sections:
        extra = f"{s.rows} rows" if s.status == "ok" else s.detail
        print(f"  {s.name.ljust(width)}  {s.status:13s}  {s.seconds:6.1f} s  {extra}")
    print(f"results: {out_dir}/<name>.json")


def write_outputs(out_dir: Path) -> list[str]:
    """SUMMARY.md, plots (where matplotlib is installed) and, for the repository's own results
    folder, the README's performance section. Returns the problems met (empty: all written)."""
    from mmfuse.bench import plot, report

    problems = []
    try:
        print(f"summary: {report.write_summary(out_dir)}")
    except (OSError, ValueError) as exc:
        problems.append(f"summary: {exc}")
    try:
        for path in plot.draw_all(out_dir, out_dir / "plots"):
            print(f"plot: {path}")
    except plot.MatplotlibMissing as exc:
        print(f"plots skipped: {exc}")
    except (OSError, ValueError) as exc:
        problems.append(f"plots: {exc}")
    if out_dir.resolve() == RESULTS_DIR.resolve() and README.is_file():
        try:
            changed = report.update_readme(README, out_dir)
            print(f"README performance section {'rewritten' if changed else 'unchanged'}: {README}")
        except (OSError, ValueError) as exc:
            problems.append(f"README: {exc}")
    return problems


def run_benchmarks(quick: bool = False, only: list[str] | None = None, device: torch.device | str | None = None,
                   out_dir: Path | str | None = None, tiny: bool = False, threads: int | None = None) -> int:
    """Run the selected modules (all by default) in registry order; 0 when none failed, else 1."""
    if isinstance(only, str):
        raise TypeError("only: a list of module names, not a string (parse_only splits '--only a,b')")
    unknown = sorted(set(only or ()) - set(REGISTRY))
    if unknown or only == []:
        raise ValueError(f"only: unknown or no module(s) {unknown}; choose from {list(REGISTRY)}")
    names = list(REGISTRY) if only is None else [n for n in REGISTRY if n in only]
    device = resolve_device(None if device is None else str(device))
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    size = "tiny" if tiny else "quick" if quick else "full"
    start = time.perf_counter()
    sections = []
    with bench_process(threads):
        for i, name in enumerate(names, 1):
            print(f"\n== {name} ({i}/{len(names)}, {size}, {device}) ==", flush=True)
            sections.append(run_section(name, quick, device, out, tiny))
            print(f"-- {name}: {sections[-1].status} in {sections[-1].seconds:.1f} s", flush=True)
    print("\n== SUMMARY.md and plots ==")
    problems = write_outputs(out)
    print_summary(sections, time.perf_counter() - start, out)
    for problem in problems:
        print(f"error: {problem}")
    failed = [s.name for s in sections if s.status == "failed"]
    if failed:
        print(f"error: failed: {', '.join(failed)} (the other modules' results are written)")
    return 1 if failed or problems else 0
