"""Markdown from the results files: ``SUMMARY.md`` and the README's performance section.

* ``SUMMARY.md`` (beside the results): per device, one table per module from its latest run on that
  device, with ``vs_mmfuse``, peak memory and the run's date, git sha and config.
* The README section, between ``<!-- perf:begin -->`` and ``<!-- perf:end -->``: a few headline
  ratios per module and device, each read from a row of the files (a missing row is left out, never
  filled in), with the git sha and date of the run it came from.

    mmfuse bench report [--results DIR] [--readme README.md]
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable

from mmfuse.bench.common import RESULTS_DIR
from mmfuse.bench.run import REGISTRY

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
RUN_KEYS = ("date", "device", "device_type", "torch", "triton", "git_sha", "config", "rows")

# Per module: the columns naming a case, then the measured ones (columns no row has are dropped).
MEASURED = ["ms", "ms_range", "vs_mmfuse", "peak_mib"]
COLUMNS: dict[str, tuple[list[str], list[str]]] = {
    "attention": (["case", "seq_len", "mode", "impl"], ["tflops", "gbps", "error"]),
    "routed": (["layer", "split", "mode", "impl"], ["vs_dense", "tflops", "error"]),
    "norms": (["op", "shape", "mode", "impl"], ["gbps", "error"]),
    "losses": (["loss", "shape", "mode", "impl"], ["gbps", "of_copy", "error"]),
    "linear_cross_entropy": (["N", "D", "V", "mode", "impl"], ["mem_vs_eager", "tflops", "error"]),
    "training": (["family", "size", "params", "seq_len", "batch", "impl"],
                 ["tokens_per_s", "images_per_s", "tflops", "mfu", "error"]),
    "sampling": (["kind", "family", "batch", "sources", "prompt_len", "image_tokens", "new_tokens", "cfg", "steps",
                  "image_px", "impl"],
                 ["tokens_per_s", "ms_per_image", "prefill_ms", "denoise_ms", "decode_ms", "gbps", "mbu",
                  "tokens_match", "max_diff", "error"]),
    "patch": (["what", "op", "shape", "mode", "impl"], ["tokens_per_s", "error"]),
    "startup": (["what", "impl"], ["budget_ms", "within_budget", "error"]),
}


# ----------------------------------------------------------------------------------------------
# Reading the results
# ----------------------------------------------------------------------------------------------


def load_runs(results_dir: Path | str) -> dict[str, list[dict]]:
    """module name -> its runs (oldest first), from every ``<name>.json`` in ``results_dir``."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) and "device" in r and isinstance(r.get("rows"), list)
                                                  for r in data):
            raise ValueError(f"{path}: expected a list of runs, each with 'device' and 'rows'")
        runs[path.stem] = data
    return runs


def module_order(names) -> list[str]:
    """Registry order first, then any other result files alphabetically."""
    return [n for n in REGISTRY if n in names] + sorted(n for n in names if n not in REGISTRY)


def latest_runs(results_dir: Path | str) -> dict[str, dict[str, dict]]:
    """device name -> module -> the last run appended for that device (devices: cpu first, then cuda)."""
    by_device: dict[str, dict[str, dict]] = {}
    kinds: dict[str, str] = {}
    runs = load_runs(results_dir)
    for module in module_order(runs):
        for run in runs[module]:
            by_device.setdefault(run["device"], {})[module] = run  # later runs replace earlier ones
            kinds[run["device"]] = run.get("device_type", "")
    return {d: by_device[d] for d in sorted(by_device, key=lambda d: (kinds[d], d))}


def device_slug(device: str) -> str:
    """A file-name-safe form of a device name: 'cpu (x86_64, 2 cores)' -> 'cpu-x86-64-2-cores'."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _config_value(v) -> str:
    if isinstance(v, dict) and "label" in v:
        return str(v["label"])
    text = str(v)
    return text if len(text) <= 40 else "…"  # nested size tables: in the JSON file


def _run_line(run: dict) -> str:
    config = ", ".join(f"{k}={_config_value(v)}" for k, v in (run.get("config") or {}).items())
    return (f"{run.get('date', '?')} · git {run.get('git_sha', '?')} · torch {run.get('torch', '?')} · "
            f"triton {run.get('triton', '?')} · config: {config or '-'}")


# ----------------------------------------------------------------------------------------------
# SUMMARY.md
# ----------------------------------------------------------------------------------------------


def _cell(row: dict, col: str) -> str:
    if col == "ms_range":
        return f"{row['ms_min']:.4g}–{row['ms_max']:.4g}" if _num(row.get("ms_min")) and _num(row.get("ms_max")) else "-"
    if col == "error" and row.get("error"):
        return _fmt(str(row["error"])[:70])
    return _fmt(row.get(col))


def module_table(module: str, rows: list[dict]) -> str:
    """One markdown table of a run's rows; columns that no row fills are left out."""
    keys, extra = COLUMNS.get(module, (None, []))
    if keys is None:  # a module this report does not know: every column, in first-seen order
        measured = {"ms", "ms_min", "ms_max", "vs_mmfuse", "peak_mib"}
        keys = list(dict.fromkeys(k for r in rows for k in r if k not in measured))
    columns = [c for c in keys + MEASURED + extra
               if any(_cell(r, c) != "-" for r in rows)]
    lines = ["| " + " | ".join("ms min–max" if c == "ms_range" else c for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(results_dir: Path | str) -> str:
    latest = latest_runs(results_dir)
    out = ["# Benchmark results", "",
           "Generated by `mmfuse bench report` from the JSON files in this folder: the latest run per device of "
           "each module (earlier runs stay in the files). `ms`: median step time; `vs_mmfuse`: the row's time over "
           "mmfuse's on the same case (> 1: mmfuse is faster); `peak_mib`: extra memory at the step's peak (MiB).",
           ""]
    if not latest:
        out += ["No results yet: run `mmfuse bench --quick`.", ""]
    for device, modules in latest.items():
        out += [f"## {device}", ""]
        for module, run in modules.items():
            out += [f"### {module}", "", _run_line(run), "", module_table(module, run["rows"]), ""]
    return "\n".join(out)


def write_summary(results_dir: Path | str, path: Path | str | None = None) -> Path:
    path = Path(path) if path is not None else Path(results_dir) / "SUMMARY.md"
    _write_atomic(path, summary_markdown(results_dir))
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Headlines: (comparison, result) pairs per module, each from rows that are in the file
# ----------------------------------------------------------------------------------------------


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _mib(v: float) -> str:
    return f"{v:.0f} MiB" if v >= 10 else f"{v:.2g} MiB"


def _rows(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _one(rows: list[dict], **match) -> dict | None:
    found = _rows(rows, **match)
    return found[0] if found else None


def _timed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if _num(r.get("ms"))]


def _ratio(rows: list[dict], **match) -> float | None:
    row = _one(rows, **match)
    return row["vs_mmfuse"] if row and _num(row.get("vs_mmfuse")) else None


def attention_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    train = _timed(_rows(rows, case="train_packed"))
    lengths = [r["seq_len"] for r in train if r["impl"] == "mmfuse" and r.get("mode") == "fwd+bwd"]
    if not lengths:
        return []
    length, out = max(lengths), []
    for impl, label in (("sdpa_dense_mask", "SDPA + dense mask"), ("flex_attention", "FlexAttention"),
                        ("flash_attn_causal", "flash-attn, plain causal")):
        for mode in ("fwd+bwd", "fwd"):  # the training step where the baseline has one
            ratio = _ratio(train, impl=impl, mode=mode, seq_len=length)
            if ratio is not None:
                out.append((f"mixed-mask attention {mode}, L={length}, vs {label}", _x(ratio)))
                break
    ours = _one(train, impl="mmfuse", mode="fwd+bwd", seq_len=length) or {}
    if _num(ours.get("tflops")):
        out.append((f"mixed-mask attention fwd+bwd, L={length}, useful work", f"{ours['tflops']:.0f} TFLOP/s"))
    return out


def routed_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    mlp = _timed(_rows(rows, layer="mlp", mode="fwd+bwd"))
    splits = list(dict.fromkeys(r["split"] for r in mlp if r["impl"] == "mmfuse"))
    if not splits:
        return []
    split = "50/50" if "50/50" in splits else splits[0]
    out = []
    for impl, label in (("where", "both experts + torch.where"), ("gather", "gather / scatter per expert"),
                        ("dense", "one dense layer (same FLOPs)")):
        ratio = _ratio(mlp, impl=impl, split=split)
        if ratio is not None:
            out.append((f"routed SwiGLU MLP fwd+bwd ({split} text/image) vs {label}", _x(ratio)))
    return out


def _per_op(rows: list[dict], key: str, baselines: tuple[str, ...]) -> str | None:
    """'op 1.23x, op2 0.98x' for each op's first case vs its baseline (fwd+bwd where timed)."""
    parts = []
    for op in dict.fromkeys(r[key] for r in rows if key in r):
        for mode in ("fwd+bwd", "fwd"):
            ratio = next((r["vs_mmfuse"] for r in _timed(_rows(rows, **{key: op}, mode=mode))
                          if r["impl"] in baselines and _num(r.get("vs_mmfuse"))), None)
            if ratio is not None:
                parts.append(f"{op} {_x(ratio)}" + ("" if mode == "fwd+bwd" else " (fwd)"))
                break
    return ", ".join(parts) or None


def norms_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    text = _per_op(rows, "op", ("transformers", "both+where", "eager"))
    return [("norms / RoPE / SwiGLU fwd+bwd vs transformers' or eager PyTorch", text)] if text else []


def losses_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    text = _per_op(rows, "loss", ("eager",))
    return [("losses fwd+bwd vs eager PyTorch", text)] if text else []


def linear_ce_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    ours = [r for r in _timed(_rows(rows, impl="mmfuse", mode="fwd+bwd")) if all(k in r for k in "NDV")]
    if not ours:
        return []
    mine = max(ours, key=lambda r: (r["N"] * r["D"] * r["V"], r["N"]))
    case = dict(N=mine["N"], D=mine["D"], V=mine["V"], mode="fwd+bwd")
    where = f"N={mine['N']} D={mine['D']} V={mine['V']}"
    out = []
    eager = _one(rows, impl="eager", **case)
    if eager and _num(mine.get("peak_mib")) and _num(eager.get("peak_mib")) and eager["peak_mib"] > 0:
        out.append((f"fused linear cross-entropy fwd+bwd ({where}): peak memory vs eager",
                    f"{mine['peak_mib'] / eager['peak_mib']:.2f}x ({_mib(mine['peak_mib'])} vs {_mib(eager['peak_mib'])})"))
    for impl, label in (("eager", "eager"), ("liger", "Liger-Kernel")):
        ratio = _ratio(rows, impl=impl, **case)
        if ratio is not None:
            out.append((f"fused linear cross-entropy fwd+bwd ({where}): time vs {label}", _x(ratio)))
    return out


FAMILIES = {"llamafusion": "LlamaFusion", "metamorph": "MetaMorph", "metaquery": "MetaQuery"}


def training_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    out = []
    base_rows = [r for r in _timed(_rows(rows, impl="baseline")) if _num(r.get("vs_mmfuse"))]
    for family in dict.fromkeys(r.get("family") for r in base_rows):
        base = max(_rows(base_rows, family=family),
                   key=lambda r: tuple(r.get(k) if _num(r.get(k)) else 0 for k in ("params", "seq_len", "batch")))
        case = {k: base.get(k) for k in ("family", "size", "seq_len", "batch")}
        text = _x(base["vs_mmfuse"])
        ours = _one(rows, impl="mmfuse", **case)
        if ours and _num(ours.get("peak_mib")) and _num(base.get("peak_mib")) and base["peak_mib"] > 0:
            text += f"; peak memory {ours['peak_mib'] / base['peak_mib']:.2f}x the baseline's"
        name = FAMILIES.get(family, str(family))
        out.append((f"{name} training step ({base.get('size')}, L={base.get('seq_len')}) vs plain PyTorch", text))
    return out


def sampling_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    out = []
    decode = [r for r in _timed(_rows(rows, kind="decode", impl="transformers")) if _num(r.get("vs_mmfuse"))]
    if decode:
        base = max(decode, key=lambda r: (r.get("prompt_len", 0), r.get("batch", 0), r.get("new_tokens", 0)))
        case = {k: base.get(k) for k in ("batch", "prompt_len", "new_tokens")}
        text = _x(base["vs_mmfuse"])
        ours = _one(rows, kind="decode", impl="mmfuse", **case)
        if ours and _num(ours.get("tokens_per_s")) and _num(base.get("tokens_per_s")):
            text += f" ({ours['tokens_per_s']:.0f} vs {base['tokens_per_s']:.0f} tokens/s)"
        compiled = _one(rows, kind="decode", impl="mmfuse_compiled", **case)
        if compiled and _num(compiled.get("ms")) and _num(base.get("ms")) and compiled["ms"] > 0:
            text += f"; with `compile=True` {_x(base['ms'] / compiled['ms'])}"
            if _num(compiled.get("tokens_per_s")):
                text += f" ({compiled['tokens_per_s']:.0f} tokens/s)"
        out.append((f"decode (batch {case['batch']}, prompt {case['prompt_len']}, {case['new_tokens']} new tokens) "
                    "vs transformers generate", text))
    image = [r for r in _timed(_rows(rows, kind="image", impl="recompute")) if _num(r.get("vs_mmfuse"))]
    if image:
        longest = max(r.get("prompt_len", 0) for r in image)
        for cfg in (True, False):
            r = _one(image, prompt_len=longest, cfg=cfg)
            if r:
                out.append((f"image sampling, prompt {longest} tokens, cfg {'on' if cfg else 'off'}: KV-cached prefix "
                            "vs recomputing it every step", _x(r["vs_mmfuse"])))
    for r in _timed(_rows(rows, kind="e2e", impl="cached")):
        stages = [k for k in ("prefill_ms", "denoise_ms", "decode_ms") if _num(r.get(k))]
        split = " + ".join(f"{k.removesuffix('_ms')} {r[k]:.0f}" for k in stages)
        recompute = _one(rows, kind="e2e", impl="recompute", family=r.get("family"))
        text = f"{r['ms']:.0f} ms ({split})"
        if recompute and _num(recompute.get("vs_mmfuse")):
            text += f"; {_x(recompute['vs_mmfuse'])} vs recomputing the prompt every step"
        out.append((f"{r.get('family')}: prompt ({r.get('prompt_len')} tokens) -> {r.get('image_px')} px image, "
                    f"{r.get('steps')} steps, cfg", text))
    understand = _one(_timed(_rows(rows, kind="understand", impl="transformers")))
    ours = _one(rows, kind="understand", impl="mmfuse")
    if understand and ours and _num(understand.get("vs_mmfuse")):
        text = _x(understand["vs_mmfuse"])
        if _num(ours.get("tokens_per_s")) and _num(understand.get("tokens_per_s")):
            text += f" ({ours['tokens_per_s']:.0f} vs {understand['tokens_per_s']:.0f} tokens/s)"
        out.append((f"image in, text out: LLaVA-NeXT, one picture ({understand.get('image_tokens')} image tokens), "
                    f"{understand.get('new_tokens')} new tokens vs transformers generate", text))
    edits = sorted(_timed(_rows(rows, kind="edit", impl="cached")), key=lambda r: r.get("sources", 0))
    if edits:
        fewest, most = edits[0], edits[-1]
        recompute = _one(rows, kind="edit", impl="recompute", sources=most.get("sources"))
        text = (f"denoise {fewest.get('denoise_ms', 0):.0f} ms with {fewest.get('sources')} -> "
                f"{most.get('denoise_ms', 0):.0f} ms with {most.get('sources')} ({most.get('prompt_len')} positions)")
        if recompute and _num(recompute.get("vs_mmfuse")):
            text += f"; {_x(recompute['vs_mmfuse'])} vs recomputing the sources every step"
        out.append((f"llamafusion editing: source pictures in the KV-cached prefix, {most.get('steps')} steps, "
                    "3 guidance branches", text))
    return out


def patch_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    out = []
    for what, label in (("train_step", "training step"), ("generate", "generate")):
        found = [r for r in _timed(rows) if r.get("what", r.get("op")) == what]  # "op": an earlier name
        base, ours = _one(found, impl="transformers"), _one(found, impl="mmfuse")
        if base is None or not _num(base.get("vs_mmfuse")):
            continue
        text = _x(base["vs_mmfuse"])
        if ours and _num(ours.get("peak_mib")) and _num(base.get("peak_mib")) and base["peak_mib"] > 0:
            text += f"; peak memory {ours['peak_mib'] / base['peak_mib']:.2f}x unpatched"
        out.append((f"`mmfuse.patch(model)` {label} vs unpatched transformers", text))
    return out


def startup_headlines(rows: list[dict]) -> list[tuple[str, str]]:
    timed = {r.get("what"): r for r in _timed(rows)}
    help_row, torch_row = timed.get("mmfuse --help"), timed.get("python -c 'import torch'")
    commands = [r for w, r in timed.items() if r.get("impl") == "mmfuse_command"]
    if help_row is None:
        return []
    text = f"{help_row['ms']:.0f} ms"
    if commands:
        slowest = max(commands, key=lambda r: r["ms"])
        text += f"; `{slowest['what']}` {slowest['ms'] / 1e3:.1f} s (budget {slowest['budget_ms'] / 1e3:.0f} s)"
    if torch_row is not None:
        text += f"; `import torch` alone {torch_row['ms'] / 1e3:.1f} s"
    return [("command-line start-up: `mmfuse --help`", text)]


HEADLINES: dict[str, Callable[[list[dict]], list[tuple[str, str]]]] = {
    "attention": attention_headlines,
    "routed": routed_headlines,
    "norms": norms_headlines,
    "losses": losses_headlines,
    "linear_cross_entropy": linear_ce_headlines,
    "training": training_headlines,
    "sampling": sampling_headlines,
    "patch": patch_headlines,
    "startup": startup_headlines,
}


# ----------------------------------------------------------------------------------------------
# The README section
# ----------------------------------------------------------------------------------------------


def _link(target: Path, base: Path) -> str:
    return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()


def perf_section(results_dir: Path | str, base_dir: Path | str) -> str:
    """The README's performance section; links are relative to ``base_dir`` (the README's folder)."""
    results_dir, base_dir = Path(results_dir), Path(base_dir)
    latest = latest_runs(results_dir)
    summary = _link(results_dir / "SUMMARY.md", base_dir)
    out = [f"Generated by `mmfuse bench report` from the latest run per device in `{_link(results_dir, base_dir)}/` "
           "(`mmfuse bench --quick` reruns everything and rewrites this section). Time ratios are the baseline's time "
           "over mmfuse's on the same inputs (> 1: mmfuse is faster); memory ratios are mmfuse's peak over the "
           f"baseline's (< 1: mmfuse needs less). All rows: [SUMMARY.md]({summary})."]
    if not latest:
        out += ["", "No results yet: run `mmfuse bench --quick`."]
    for device, modules in latest.items():
        lines = []
        for module, run in modules.items():
            config = run.get("config") or {}
            size = "tiny" if config.get("tiny") else "quick" if config.get("quick") else "full"
            when = f"{run.get('git_sha', '?')}, {str(run.get('date', '?'))[:10]}, {size}"
            for comparison, result in HEADLINES.get(module, lambda rows: [])(run["rows"]):
                lines.append(f"| {module} | {comparison} | {result} | {when} |")
        if not lines:
            continue
        plots = sorted((results_dir / "plots").glob(f"{device_slug(device)}_*.png"))
        out += ["", f"**{device}**" + (" — plots: " + ", ".join(
            f"[{p.stem.removeprefix(device_slug(device) + '_')}]({_link(p, base_dir)})" for p in plots) if plots else ""),
            "", "| module | comparison | result | run (git sha, date, size) |", "|---|---|---|---|", *lines]
    return "\n".join(out)


def replace_between_markers(text: str, section: str, where: str = "README") -> str:
    """``text`` with everything between the perf markers replaced by ``section`` (markers kept)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{where}: needs exactly one {BEGIN} and one {END} marker")
    begin, end = text.index(BEGIN), text.index(END)
    if end < begin:
        raise ValueError(f"{where}: {END} comes before {BEGIN}")
    return f"{text[:begin]}{BEGIN}\n{section}\n{text[end:]}"


def update_readme(readme: Path | str, results_dir: Path | str = RESULTS_DIR) -> bool:
    """Rewrite the README's perf section from ``results_dir``; True when the file changed."""
    readme = Path(readme)
    text = readme.read_text()
    new = replace_between_markers(text, perf_section(results_dir, readme.parent), str(readme))
    if new != text:
        _write_atomic(readme, new)
    return new != text
