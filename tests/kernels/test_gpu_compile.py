"""Every Triton kernel compiles for an H100 / H200 (sm_90), at the block sizes, warps and stages its
launcher picks on a GPU. CPU CI otherwise runs the kernels only through Triton's interpreter, which
accepts code the GPU compiler rejects; see ``tests/kernels/gpu_compile.py`` for how it is done."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SM90_MAX_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block can take on sm_90

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the cuda-marked tests compile and run the kernels")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile", "--arch", "90"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    *rows, summary = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows, summary


def test_every_kernel_is_launched_by_some_case(compiled):
    rows, summary = compiled
    assert not summary["driver_errors"], summary["driver_errors"]
    launched = {row["kernel"] for row in rows}
    assert launched == set(summary["kernels"]), f"no case launches {set(summary['kernels']) - launched}"


def test_every_launch_compiles_for_sm90(compiled):
    rows, _ = compiled
    failed = [f"{row['kernel']} {row.get('config')}:\n{row['error']}" for row in rows if not row["ok"]]
    assert not failed, "\n\n".join(failed)


def test_every_launch_fits_in_sm90_shared_memory(compiled):
    rows, _ = compiled
    too_big = [(row["kernel"], row["config"], row["shared"]) for row in rows
               if row["ok"] and row["shared"] > SM90_MAX_SHARED_BYTES]
    assert not too_big, too_big


# Spilled registers live in local memory (L1 / L2, then HBM). A few hundred bytes per thread is
# common in tuned Triton GEMMs; kilobytes mean the tile does not fit the register file at all (exact
# fp32 attention at the bf16 tiles spilled 5-400 KB per thread before it got its own 32 x 32 tiles).
MAX_SPILL_STACK_BYTES = 2048


def test_no_launch_spills_kilobytes_of_registers(compiled):
    rows, _ = compiled
    spilling = [(row["kernel"], row["config"], row["stack"]) for row in rows
                if row["ok"] and row["stack"] > MAX_SPILL_STACK_BYTES]
    assert not spilling, spilling
