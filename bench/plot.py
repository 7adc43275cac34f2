"""PNG plots of the latest run per device: throughput vs sequence length, latency vs prompt length, memory.

* ``<device>_throughput.png``: attention on the packed training layout, one panel per mode, a line per
  implementation: TFLOP/s of useful work where the rows carry it (GPU), else tokens/s.
* ``<device>_latency.png``: image sampling ms per image vs prompt length, a line per sampler and cfg
  setting (cached prefix vs recomputing it); decode tokens/s vs prompt length beside it.
* ``<device>_memory.png``: peak extra memory per implementation, grouped bars, one panel per module
  (training per family, kernels per case).

Drawn with matplotlib's Agg canvas (no display, no global pyplot state); a plot whose rows are not in
the results is not drawn.

    mmfuse bench plot [--results DIR] [--out DIR]
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from mmfuse.bench.report import device_slug, latest_runs

INSTALL_HINT = "pip install 'mmfuse[bench]' (or: pip install 'matplotlib>=3.8')"


class MatplotlibMissing(RuntimeError):
    """Plots need matplotlib, an optional dependency (the ``bench`` and ``dev`` extras)."""


def _figure(panels: int, width: float = 5.0, height: float = 3.6):
    """A Figure on the Agg canvas with ``panels`` axes in a grid of at most 3 columns."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"matplotlib is not installed: {INSTALL_HINT}") from None
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _timed(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if isinstance(r.get("ms"), (int, float)) and r["ms"] > 0
            and all(r.get(k) == v for k, v in match.items())]


def _lines(ax, rows: list[dict], x: str, y: Callable[[dict], float | None], series: Callable[[dict], str]) -> None:
    """One line per series, points sorted by ``x``; rows without a y value are left out."""
    for name in dict.fromkeys(series(r) for r in rows):
        points = sorted((r[x], y(r)) for r in rows if series(r) == name and y(r) is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


# ----------------------------------------------------------------------------------------------
# The three figures: each returns the path written, or None when its rows are not in the results
# ----------------------------------------------------------------------------------------------


def throughput_plot(device: str, modules: dict[str, dict], path: Path) -> Path | None:
    run = modules.get("attention")
    rows = [r for r in _timed(run["rows"] if run else [], case="train_packed") if "seq_len" in r]
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r.get("mode") == m for r in rows)]
    if not modes:
        return None
    use_tflops = all("tflops" in r for r in rows)
    batch = (run.get("config") or {}).get("batch", 1)

    def y(r):
        return r["tflops"] if use_tflops else r.get("batch", batch) * r["seq_len"] / (r["ms"] * 1e-3)

    fig, axes = _figure(len(modes))
    for ax, mode in zip(axes, modes):
        mode_rows = _timed(rows, mode=mode)
        _lines(ax, mode_rows, "seq_len", y, lambda r: r["impl"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["seq_len"] for r in mode_rows}), [str(v) for v in sorted({r["seq_len"] for r in mode_rows})])
        ax.set_xlabel("sequence length (packed text + image documents)")
        ax.set_ylabel("TFLOP/s (unmasked work)" if use_tflops else "tokens / s")
        ax.set_title(f"attention {mode}")
    fig.suptitle(f"throughput vs sequence length — {device}")
    fig.savefig(path, dpi=100)
    return path


def latency_plot(device: str, modules: dict[str, dict], path: Path) -> Path | None:
    rows = _timed((modules.get("sampling") or {}).get("rows", []))
    image = [r for r in rows if r.get("kind") == "image" and "prompt_len" in r]
    decode = [r for r in rows if r.get("kind") == "decode" and "prompt_len" in r and "batch" in r
              and r.get("tokens_per_s")]
    panels = [p for p in (image, decode) if p]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    axes = iter(axes)
    if image:
        ax = next(axes)
        _lines(ax, image, "prompt_len",
               lambda r: r.get("ms_per_image") or r["ms"] / max(1, r.get("batch") or 1),
               lambda r: f"{r['impl']}, cfg {'on' if r.get('cfg') else 'off'}")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("ms per image")
        ax.set_title("image sampling latency")
    if decode:
        ax = next(axes)
        if len({r["prompt_len"] for r in decode}) > 1:
            _lines(ax, decode, "prompt_len", lambda r: r["tokens_per_s"], lambda r: f"{r['impl']}, batch {r.get('batch')}")
            ax.set_xlabel("prompt length (tokens)")
        else:  # one prompt length: the batch is what varies
            _lines(ax, decode, "batch", lambda r: r["tokens_per_s"], lambda r: r["impl"])
            ax.set_xlabel(f"batch (prompt {decode[0]['prompt_len']} tokens)")
        ax.set_ylabel("new tokens / s")
        ax.set_title("decode throughput")
    fig.suptitle(f"sampling vs prompt length — {device}")
    fig.savefig(path, dpi=100)
    return path


# module -> (which rows, the bar group of a row): one memory panel per module with such rows
MEMORY_GROUPS: dict[str, tuple[dict, Callable[[dict], str]]] = {
    "training": ({}, lambda r: f"{r.get('family')} {r.get('size', '')}".strip()),
    "attention": ({"case": "train_packed", "mode": "fwd+bwd"}, lambda r: f"L={r.get('seq_len')}"),
    "routed": ({"mode": "fwd+bwd"}, lambda r: f"{r.get('layer')} {r.get('split')}"),
    "norms": ({"mode": "fwd+bwd"}, lambda r: str(r.get("op"))),
    "losses": ({}, lambda r: str(r.get("loss"))),
    "linear_cross_entropy": ({}, lambda r: f"{r.get('mode')} V={r.get('V')}"),
    "patch": ({}, lambda r: str(r.get("what", r.get("op")))),
}


def _bars(ax, rows: list[dict], group: Callable[[dict], str]) -> None:
    """Grouped bars: a group per case, in it a bar per implementation that has a value there (an
    implementation keeps its colour across groups)."""
    groups = list(dict.fromkeys(group(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    labelled = set()
    for g, name in enumerate(groups):
        present = [r for r in rows if group(r) == name]
        width = 0.8 / len(present)
        for i, r in enumerate(present):
            label = None if r["impl"] in labelled else r["impl"]
            labelled.add(r["impl"])
            ax.bar(g + (i - (len(present) - 1) / 2) * width, r["peak_mib"], width, color=colors[r["impl"]], label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
    ax.set_ylabel("peak extra memory (MiB)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def memory_plot(device: str, modules: dict[str, dict], path: Path) -> Path | None:
    panels = []
    for module, (match, group) in MEMORY_GROUPS.items():
        rows = [r for r in _timed((modules.get(module) or {}).get("rows", []), **match)
                if isinstance(r.get("peak_mib"), (int, float))]
        if rows:
            panels.append((module, rows, group))
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (module, rows, group) in zip(axes, panels):
        _bars(ax, rows, group)
        ax.set_title(module + (" (fwd+bwd)" if MEMORY_GROUPS[module][0].get("mode") else ""))
    fig.suptitle(f"peak memory — {device}")
    fig.savefig(path, dpi=100)
    return path


def draw_all(results_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Every plot for every device in ``results_dir`` (into ``out_dir``, default ``<results>/plots``)."""
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "plots"
    latest = latest_runs(results_dir)
    if latest:
        _figure(1)  # fail early, before creating the folder, when matplotlib is missing
        out.mkdir(parents=True, exist_ok=True)
    written = []
    for device, modules in latest.items():
        slug = device_slug(device)
        for name, draw in (("throughput", throughput_plot), ("latency", latency_plot), ("memory", memory_plot)):
            path = draw(device, modules, out / f"{slug}_{name}.png")
            if path is not None:
                written.append(path)
    return written
