"""`mmfuse bench report` / `plot`: the README section and SUMMARY.md quote the results files (and
only them), the markers bound what is rewritten, the plots are drawn, and the committed README
section is exactly what the committed results give."""
import json
import sys
from pathlib import Path

import pytest

from mmfuse.bench import plot, report
from mmfuse.bench.common import RESULTS_DIR
from mmfuse.cli import main

ROOT = Path(__file__).resolve().parents[2]
CPU = "cpu (x86_64, 2 cores)"
GPU = "NVIDIA H100 80GB HBM3"


def _run(device: str, sha: str, rows: list[dict], device_type: str = "cpu", **config) -> dict:
    return {"date": "2026-11-25T13:00:00+00:00", "device": device, "device_type": device_type,
            "torch": "2.13.0", "triton": "3.8.0", "git_sha": sha, "config": {"quick": True, **config}, "rows": rows}


def _t(ms: float, **fields) -> dict:
    return {"ms": ms, "ms_min": ms * 0.9, "ms_max": ms * 1.1, **fields}


def attention_rows(sdpa_ratio: float) -> list[dict]:
    rows = []
    for seq_len in (512, 1024):
        ratio = sdpa_ratio if seq_len == 1024 else 7.0
        rows += [
            {"impl": "mmfuse", "mode": "fwd+bwd", "case": "train_packed", "seq_len": seq_len, "batch": 1,
             "peak_mib": 11.0, "vs_mmfuse": 1.0, **_t(10.0)},
            {"impl": "sdpa_dense_mask", "mode": "fwd+bwd", "case": "train_packed", "seq_len": seq_len, "batch": 1,
             "peak_mib": 3.5, "vs_mmfuse": ratio, **_t(10.0 * ratio)},
            {"impl": "flex_attention", "mode": "fwd+bwd", "case": "train_packed", "seq_len": seq_len,
             "error": "NotImplementedError: FlexAttention does not support backward on CPU"},
            {"impl": "mmfuse", "mode": "fwd", "case": "train_packed", "seq_len": seq_len, "batch": 1,
             "peak_mib": 6.0, "vs_mmfuse": 1.0, **_t(4.0)},
        ]
    rows.append({"impl": "flex_attention", "mode": "fwd", "case": "train_packed", "seq_len": 1024, "batch": 1,
                 "peak_mib": 70.0, "vs_mmfuse": 3.25, **_t(13.0)})
    return rows


ROUTED = [
    {"layer": "-", "split": "50/50", "mode": "-", "impl": "build_routing", **_t(0.3)},
    {"layer": "mlp", "split": "50/50", "mode": "fwd+bwd", "impl": "mmfuse", "peak_mib": 300.0, "vs_mmfuse": 1.0, **_t(700)},
    {"layer": "mlp", "split": "50/50", "mode": "fwd+bwd", "impl": "where", "peak_mib": 390.0, "vs_mmfuse": 2.0261, **_t(1418)},
    {"layer": "mlp", "split": "50/50", "mode": "fwd+bwd", "impl": "gather", "peak_mib": 250.0, "vs_mmfuse": 0.9905, **_t(693)},
]
LINEAR_CE = [
    {"impl": "mmfuse", "mode": "fwd+bwd", "N": 1024, "D": 256, "V": 32000, "peak_mib": 93.29, "vs_mmfuse": 1.0,
     "mem_vs_eager": 0.2489, **_t(482.7)},
    {"impl": "eager", "mode": "fwd+bwd", "N": 1024, "D": 256, "V": 32000, "peak_mib": 374.84, "vs_mmfuse": 1.5213,
     "mem_vs_eager": 1.0, **_t(734.4)},
    {"impl": "liger", "mode": "fwd+bwd", "N": 1024, "D": 256, "V": 32000, "error": "Liger's kernels need CUDA"},
]
TRAINING = [
    {"family": "llamafusion", "impl": "mmfuse", "size": "small", "params": 1000, "seq_len": 256, "batch": 2,
     "peak_mib": 80.0, "vs_mmfuse": 1.0, "tokens_per_s": 5000.0, **_t(100.0)},
    {"family": "llamafusion", "impl": "baseline", "size": "small", "params": 1000, "seq_len": 256, "batch": 2,
     "peak_mib": 100.0, "vs_mmfuse": 1.375, "tokens_per_s": 3636.0, **_t(137.5)},
]
PATCH = [
    {"what": "train_step", "impl": "mmfuse", "peak_mib": 50.0, "vs_mmfuse": 1.0, **_t(80.0)},
    {"what": "train_step", "impl": "transformers", "peak_mib": 200.0, "vs_mmfuse": 1.25, **_t(100.0)},
    {"what": "generate", "impl": "mmfuse", "error": "RuntimeError: out of memory"},
    {"what": "generate", "impl": "transformers", "tokens_per_s": 100.0, **_t(10.0)},
]
SAMPLING = [
    {"kind": "decode", "impl": "mmfuse", "batch": 1, "prompt_len": 32, "new_tokens": 16, "tokens_per_s": 410.0,
     "vs_mmfuse": 1.0, **_t(39.0)},
    {"kind": "decode", "impl": "mmfuse_compiled", "batch": 1, "prompt_len": 32, "new_tokens": 16,
     "tokens_per_s": 624.0, "vs_mmfuse": 0.5, **_t(26.0)},
    {"kind": "decode", "impl": "transformers", "batch": 1, "prompt_len": 32, "new_tokens": 16, "tokens_per_s": 205.0,
     "vs_mmfuse": 2.0, **_t(78.0)},
]
for prompt_len, ratio in ((16, 1.5), (64, 3.75)):
    for impl in ("cached", "recompute"):
        ms = 10.0 * (ratio if impl == "recompute" else 1.0)
        SAMPLING.append({"kind": "image", "impl": impl, "prompt_len": prompt_len, "cfg": True, "steps": 4, "batch": 1,
                         "ms_per_image": ms, "vs_mmfuse": ms / 10.0, **_t(ms)})


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    files = {
        # Two CPU runs: the report quotes the later one (sdpa 2.4171), never the earlier (9.99).
        "attention": [_run(CPU, "old1234", attention_rows(9.99)), _run(CPU, "abc1234", attention_rows(2.4171)),
                      _run(GPU, "def5678", [], device_type="cuda")],
        "routed": [_run(CPU, "abc1234", ROUTED)],
        "linear_cross_entropy": [_run(CPU, "abc1234", LINEAR_CE)],
        "training": [_run(CPU, "abc1234", TRAINING)],
        "sampling": [_run(CPU, "abc1234", SAMPLING)],
        "patch": [_run(CPU, "abc1234", PATCH)],
    }
    for name, runs in files.items():
        (folder / f"{name}.json").write_text(json.dumps(runs))
    return folder


def _section(text: str) -> str:
    return text.split(report.BEGIN)[1].split(report.END)[0]


def test_readme_rewrite_touches_only_the_text_between_the_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    head, tail = "# project\n\ntext before\n\n## Performance\n\n", "\n\n## After\n\nmore text\n"
    readme.write_text(f"{head}{report.BEGIN}\nplaceholder 99.99x\n{report.END}{tail}")
    assert report.update_readme(readme, results) is True
    text = readme.read_text()
    assert text.startswith(head + report.BEGIN) and text.endswith(report.END + tail)
    assert "placeholder" not in text and "99.99x" not in text
    assert report.update_readme(readme, results) is False  # idempotent
    assert _section(text).strip() == report.perf_section(results, tmp_path)


def test_headline_numbers_are_those_of_the_latest_run_in_the_files(results, tmp_path):
    section = report.perf_section(results, tmp_path)
    expected = [
        ("attention", "fwd+bwd, L=1024, vs SDPA + dense mask", "2.42x"),
        ("attention", "fwd, L=1024, vs FlexAttention", "3.25x"),  # no fwd+bwd on CPU: fwd is quoted, as such
        ("routed", "vs both experts + torch.where", "2.03x"),
        ("routed", "vs gather / scatter per expert", "0.99x"),
        ("linear_cross_entropy", "peak memory vs eager", "0.25x (93 MiB vs 375 MiB)"),
        ("linear_cross_entropy", "time vs eager", "1.52x"),
        ("training", "LlamaFusion training step (small, L=256)", "1.38x; peak memory 0.80x the baseline's"),
        ("sampling", "decode (batch 1, prompt 32, 16 new tokens) vs transformers generate", "2.00x (410 vs 205 tokens/s); with `compile=True` 3.00x (624 tokens/s)"),
        ("sampling", "prompt 64 tokens, cfg on", "3.75x"),
        ("patch", "training step vs unpatched transformers", "1.25x; peak memory 0.25x unpatched"),
    ]
    lines = section.splitlines()
    for module, comparison, result in expected:
        matches = [ln for ln in lines if ln.startswith(f"| {module} |") and comparison in ln]
        assert len(matches) == 1, (module, comparison, section)
        assert f"| {result} | abc1234, 2026-11-25, quick |" in matches[0]
    assert "9.99" not in section and "old1234" not in section  # the earlier run
    assert f"**{CPU}**" in section and "[SUMMARY.md](results/SUMMARY.md)" in section


def test_rows_missing_from_the_files_are_left_out(results, tmp_path):
    section = report.perf_section(results, tmp_path)
    assert "Liger" not in section  # its row is an error
    assert "flash-attn" not in section and "dense layer" not in section  # no rows at all
    assert "| norms |" not in section and "| losses |" not in section
    assert "generate vs unpatched" not in section  # mmfuse's generate row is an error: no ratio
    assert "cfg off" not in section and "MetaMorph" not in section
    assert GPU not in section  # its run has no rows: no headline, no heading
    for name in ("routed", "training", "sampling", "linear_cross_entropy", "patch"):
        (results / f"{name}.json").unlink()
    section = report.perf_section(results, tmp_path)
    assert [ln.split("|")[1].strip() for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln
            and "module" not in ln] == ["attention", "attention"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No results yet" in report.perf_section(empty, tmp_path)


def test_markers_must_be_there_once(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="perf:begin"):
        report.update_readme(readme, results)
    readme.write_text(f"{report.END}\n{report.BEGIN}\n")
    with pytest.raises(ValueError, match="before"):
        report.update_readme(readme, results)


def test_summary_has_a_table_per_module_from_the_latest_run_per_device(results):
    text = report.summary_markdown(results)
    cpu, gpu = text.index(f"## {CPU}"), text.index(f"## {GPU}")
    assert cpu < gpu  # cpu before cuda
    cpu_part = text[cpu:gpu]
    for name in ("attention", "routed", "linear_cross_entropy", "training", "sampling"):
        assert f"### {name}" in cpu_part
    assert "git abc1234" in cpu_part and "old1234" not in text
    assert "| train_packed | 1024 | fwd+bwd | sdpa_dense_mask | 24.17 | 21.75–26.59 | 2.417 | 3.5 |" in cpu_part
    assert "FlexAttention does not support backward" in cpu_part
    assert "tflops" not in cpu_part  # a column no row fills is left out


def test_report_command_writes_summary_and_readme(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{report.BEGIN}\n{report.END}\n")
    assert main(["bench", "report", "--results", str(results), "--readme", str(readme)]) == 0
    assert (results / "SUMMARY.md").read_text() == report.summary_markdown(results)
    assert "2.42x" in readme.read_text()
    assert main(["bench", "report", "--results", str(tmp_path / "missing")]) == 1
    assert "no results folder" in capsys.readouterr().err
    (results / "broken.json").write_text("{not json")
    assert main(["bench", "report", "--results", str(results)]) == 1
    assert "broken.json" in capsys.readouterr().err


def test_plots_are_drawn_per_device_from_the_results(results, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    assert main(["bench", "plot", "--results", str(results), "--out", str(out)]) == 0
    slug = report.device_slug(CPU)
    assert slug == "cpu-x86-64-2-cores"
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{slug}_latency.png", f"{slug}_memory.png", f"{slug}_throughput.png"]  # the GPU run is empty
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    (results / "sampling.json").unlink()
    assert [p.name for p in plot.draw_all(results, tmp_path / "again")] == [f"{slug}_throughput.png",
                                                                            f"{slug}_memory.png"]
    # The README section links the plots of its device that exist.
    assert f"[latency](results/plots/{slug}_latency.png)" not in report.perf_section(results, tmp_path)
    plot.draw_all(results)
    assert f"[memory](results/plots/{slug}_memory.png)" in report.perf_section(results, tmp_path)


def test_plot_without_matplotlib_says_how_to_install_it(results, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    assert main(["bench", "plot", "--results", str(results)]) == 1
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install" in err and "Traceback" not in err
    assert not (results / "plots").exists()


def test_committed_readme_section_and_summary_are_generated_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert _section(readme).strip() == report.perf_section(RESULTS_DIR, ROOT), \
        "README perf section is stale: run `mmfuse bench report --readme README.md`"
    assert (RESULTS_DIR / "SUMMARY.md").read_text() == report.summary_markdown(RESULTS_DIR), \
        "bench/results/SUMMARY.md is stale: run `mmfuse bench report`"
