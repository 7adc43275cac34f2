"""`mmfuse bench`: the runner writes schema-valid result files, survives a missing or failing module,
and rejects bad options with a message that says what is valid."""
import datetime
import importlib
import json
import math
import sys
import types

import pytest
import torch

from mmfuse.bench import report
from mmfuse.bench import run as bench_run
from mmfuse.bench.common import append_results
from mmfuse.cli import main

RUN_KEYS = {"date", "device", "device_type", "torch", "triton", "git_sha", "config", "rows"}
# Baselines that record why they have no time on a CPU machine: FlexAttention has no CPU backward,
# flash-attn and Liger-Kernel need CUDA.
CANNOT_RUN_ON_CPU = {"flex_attention", "flash_attn_causal", "liger"}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(f"mmfuse.bench.{bench_run.REGISTRY[name]}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mmfuse.bench.{bench_run.REGISTRY[name]}":
            return False  # not written yet: the runner skips it, so does this test
        raise
    return True


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_run(run: dict, name: str) -> None:
    """One appended run of module ``name`` follows the results schema (see bench/common.py's append_results)."""
    assert RUN_KEYS <= set(run), name
    assert run["device_type"] == "cpu" and run["device"].startswith("cpu")
    assert datetime.datetime.fromisoformat(run["date"]).tzinfo is not None
    assert run["torch"] == torch.__version__ and run["git_sha"]
    assert run["config"]["quick"] is True and run["config"]["tiny"] is True
    rows = run["rows"]
    assert rows and all(isinstance(r.get("impl"), str) for r in rows), name
    for r in rows:
        if "ms" not in r:
            assert r.get("error"), (name, r)  # an untimed row says why
            assert r["impl"] in CANNOT_RUN_ON_CPU, (name, r)  # everything else must run
            continue
        assert all(_positive(r[k]) for k in ("ms", "ms_min", "ms_max")), (name, r)
        assert r["ms_min"] <= r["ms"] <= r["ms_max"], (name, r)
        if "vs_mmfuse" in r:
            assert _positive(r["vs_mmfuse"]), (name, r)
        if r.get("peak_mib") is not None:
            assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0, (name, r)
        if name == "losses" and "gbps" in r:  # held against the copy bandwidth measured in the same run
            assert _positive(run["config"]["copy_gbps"]), run["config"]
            assert r["of_copy"] == pytest.approx(r["gbps"] / run["config"]["copy_gbps"]), (name, r)
    # The reference implementation of each case: "mmfuse", or the cached sampler for image rows.
    reference = [r for r in rows if "ms" in r and r["impl"] in ("mmfuse", "cached")]
    assert reference, name
    assert all(r["vs_mmfuse"] == 1.0 for r in reference), name
    baselines = [r for r in rows if "ms" in r and "vs_mmfuse" in r and r["impl"] not in ("mmfuse", "cached")]
    assert baselines, name  # something was compared


def test_quick_run_on_tiny_shapes_writes_schema_valid_results(tmp_path, capsys):
    names = [n for n in bench_run.REGISTRY if _importable(n)]
    assert set(bench_run.KERNEL_MODULES) <= set(names)
    threads = torch.get_num_threads()
    rc = main(["bench", "--quick", "--tiny", "--threads", "1", "--only", ",".join(names), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    for i, name in enumerate(names, 1):
        assert f"== {name} ({i}/{len(names)}, tiny, cpu) ==" in printed
        runs = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(runs) == 1
        check_run(runs[0], name)
    assert f"{len(names)} section(s) in" in printed and str(tmp_path) in printed
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert all(f"### {name}" in summary for name in names)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots").is_dir() and any((tmp_path / "plots").glob("*_throughput.png"))


def test_threads_option_is_restored_after_the_run(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    seen = []

    def fake_run(quick, device, out_dir, tiny=False):
        seen.append(torch.get_num_threads())
        return []

    module = types.ModuleType("mmfuse.bench.bench_fake")
    module.run = fake_run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(bench_run, "REGISTRY", {"fake": "bench_fake"})
    assert bench_run.run_benchmarks(only=["fake"], out_dir=tmp_path, tiny=True, threads=1) == 0
    assert seen == [1] and torch.get_num_threads() == before


def _fake_module(name: str, run) -> types.ModuleType:
    module = types.ModuleType(f"mmfuse.bench.bench_{name}")
    module.run = run
    return module


def test_a_missing_module_is_skipped_and_a_failing_one_does_not_lose_the_others(tmp_path, monkeypatch, capsys):
    def boom(quick, device, out_dir, tiny=False):
        raise RuntimeError("kaboom")

    def fine(quick, device, out_dir, tiny=False):
        rows = [{"impl": "mmfuse", "ms": 1.0, "ms_min": 0.9, "ms_max": 1.2, "vs_mmfuse": 1.0}]
        append_results("fine", device, {"quick": quick, "tiny": tiny}, rows, out_dir)
        return rows

    for name, run in (("boom", boom), ("fine", fine)):
        monkeypatch.setitem(sys.modules, f"mmfuse.bench.bench_{name}", _fake_module(name, run))
    monkeypatch.setattr(bench_run, "REGISTRY", {"ghost": "bench_ghost", "boom": "bench_boom", "fine": "bench_fine"})
    assert bench_run.run_benchmarks(quick=True, out_dir=tmp_path, tiny=True) == 1
    printed = capsys.readouterr()
    assert "ghost: not available" in printed.out and "kaboom" in printed.err  # the traceback
    assert "failed: boom" in printed.out
    assert json.loads((tmp_path / "fine.json").read_text())[0]["rows"][0]["ms"] == 1.0
    assert "### fine" in (tmp_path / "SUMMARY.md").read_text()


def test_a_run_into_the_repository_results_rewrites_the_readme_section(tmp_path, monkeypatch):
    def fine(quick, device, out_dir, tiny=False):
        rows = [{"impl": "mmfuse", "ms": 1.0, "ms_min": 0.9, "ms_max": 1.2, "vs_mmfuse": 1.0}]
        append_results("fine", device, {"quick": quick, "tiny": tiny}, rows, out_dir)
        return rows

    monkeypatch.setitem(sys.modules, "mmfuse.bench.bench_fine", _fake_module("fine", fine))
    monkeypatch.setattr(bench_run, "REGISTRY", {"fine": "bench_fine"})
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\n")
    monkeypatch.setattr(bench_run, "README", readme)
    monkeypatch.setattr(bench_run, "RESULTS_DIR", tmp_path / "results")
    assert bench_run.run_benchmarks(out_dir=tmp_path / "elsewhere", tiny=True) == 0
    assert "old" in readme.read_text()  # a run into another folder leaves the README alone
    assert bench_run.run_benchmarks(tiny=True) == 0
    assert readme.read_text() == f"intro\n{report.BEGIN}\n{report.perf_section(tmp_path / 'results', tmp_path)}\n{report.END}\n"


def test_a_module_without_the_tiny_parameter_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mmfuse.bench.bench_old", _fake_module("old", lambda quick, device, out_dir: []))
    monkeypatch.setattr(bench_run, "REGISTRY", {"old": "bench_old"})
    assert bench_run.run_benchmarks(out_dir=tmp_path, tiny=True) == 1
    assert "run(quick, device, out_dir, tiny=False)" in capsys.readouterr().err


def test_only_takes_comma_separated_names_in_registry_order():
    assert bench_run.parse_only("norms, attention") == ["attention", "norms"]
    assert bench_run.parse_only(None) == list(bench_run.REGISTRY)
    with pytest.raises(ValueError, match="no module given"):
        bench_run.parse_only(" , ")


def test_only_rejects_unknown_names_listing_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "attention,atention"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--only" in err and "'atention'" in err and all(name in err for name in bench_run.REGISTRY)
    with pytest.raises(ValueError, match="only"):
        bench_run.run_benchmarks(only=["nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device"):
        bench_run.resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device"):
        bench_run.resolve_device("mps")


@pytest.mark.parametrize("argv, message", [
    (["plot", "--quick"], "--quick applies to `mmfuse bench run`"),
    (["report", "--out", "x"], "--out applies to `mmfuse bench run|plot`"),
    (["--readme", "README.md"], "--readme applies to `mmfuse bench report`"),
    (["--threads", "0"], "positive integer"),
])
def test_options_outside_their_action_are_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_help_explains_the_actions_and_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("run", "plot", "report", "--quick", "--only", "--device", "--out", "--threads", "--results",
                 "--readme", "perf:begin"):
        assert text in out, text
    assert "--tiny" not in out  # the tests' option stays out of the help
