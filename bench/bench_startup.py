"""Start-up time of the command line: what a user waits for before anything runs.

Rows: ``mmfuse --help`` (imports no torch), ``mmfuse train --help`` and ``mmfuse generate --help``
(they import torch and the model families to document them), each a fresh ``python -m mmfuse``
process, timed from spawn to exit; beside them the floor every torch program pays,
``python -c "import torch"``. ``budget_ms`` is the target a command should start within on 2 CPU
cores (3 s), ``within_budget`` whether it did; ``vs_mmfuse`` = the row's ms / ``mmfuse --help``'s.

    python -m mmfuse.bench.bench_startup [--quick] [--out DIR]
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

from mmfuse.bench.common import add_ratio, append_results, bench_main, print_table

BUDGET_MS = 3000.0
COMMANDS = {
    "mmfuse --help": [sys.executable, "-m", "mmfuse", "--help"],
    "mmfuse train --help": [sys.executable, "-m", "mmfuse", "train", "--help"],
    "mmfuse generate --help": [sys.executable, "-m", "mmfuse", "generate", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def _wall_ms(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    return (time.perf_counter() - t0) * 1e3


def run(quick: bool, device: torch.device, out_dir: str | None, tiny: bool = False) -> list[dict]:
    reps = 1 if tiny else 3 if quick else 7
    rows = []
    for what, argv in COMMANDS.items():
        _wall_ms(argv)  # warm the file cache: the first start of the session reads every .pyc from disk
        times = [_wall_ms(argv) for _ in range(reps)]
        ms = statistics.median(times)
        impl = "mmfuse" if what == "mmfuse --help" else ("torch" if "import torch" in what else "mmfuse_command")
        rows.append({"what": what, "impl": impl, "ms": ms, "ms_min": min(times), "ms_max": max(times),
                     "budget_ms": BUDGET_MS if impl != "torch" else None,
                     "within_budget": ms <= BUDGET_MS if impl != "torch" else None})
    for row in rows:
        row["case"] = "startup"
    add_ratio(rows, ("case",), "vs_mmfuse")
    print_table(rows, ["what", "impl", "ms", "ms_min", "ms_max", "vs_mmfuse", "budget_ms", "within_budget"])
    append_results("startup", "cpu", dict(quick=quick, tiny=tiny, reps=reps, budget_ms=BUDGET_MS), rows, out_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    bench_main(run, __doc__, argv, quick_help="3 repetitions instead of 7")


if __name__ == "__main__":
    main()
