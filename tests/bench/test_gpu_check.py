"""bench/gpu_check.sh on CPU: its argument handling and its dry run (the real run needs a GPU)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_help_and_bad_arguments():
    shown = run("--help")
    assert shown.returncode == 0 and "gpu_check.sh OUT" in shown.stdout and "pytest -m cuda" in shown.stdout
    for args, words in ((), "give the output folder"), (("a", "b"), "one OUT folder"), \
            (("out", "--frobnicate"), "unknown option --frobnicate"), (("out", "--tests-timeout", "soon"), "whole seconds"):
        bad = run(*args)
        assert bad.returncode == 2 and words in bad.stderr, (args, bad.stderr)


def test_wheels_must_be_a_folder_of_wheels(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = run(str(tmp_path / "out"), "--wheels", str(tmp_path / "empty"))
    assert bad.returncode == 2 and "holds no .whl files" in bad.stderr


def test_the_dry_run_writes_the_plan_and_runs_nothing(tmp_path):
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    done = run(str(tmp_path / "out"), "--dry-run", "--wheels", str(tmp_path / "whl"), "--bench-timeout", "100")
    assert done.returncode == 0, done.stderr
    plan = (tmp_path / "out" / "plan.txt").read_text()
    for step in ("pytest -m cuda", "--junitxml", "mmfuse bench --quick --device cuda", "timeout 100",
                 "--no-index --no-deps", "whl/*.whl", "results.tar.gz", "SUMMARY.md"):
        assert step in plan, step
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plan.txt"]  # nothing else ran
