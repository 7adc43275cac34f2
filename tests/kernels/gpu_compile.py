"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one.

CI runs the kernels through Triton's interpreter, which accepts code that the real compiler
rejects (loop-carried values that change type, operations the GPU backend lacks, tiles that
overflow shared memory). This script closes that gap without a GPU: it calls each public op with
``backend="triton"`` on CPU tensors, with the launches *recorded* instead of run and the block
sizes the launchers choose for a GPU (their interpreter branches switched off), then compiles
every distinct launch through Triton's NVIDIA backend down to a cubin (ptxas ships with Triton).

Run in a process without ``TRITON_INTERPRET`` (``@triton.jit`` picks the interpreter at import).
Prints one JSON object per line: ``{"kernel", "ok", "config", "shared", "registers", "stack", "error"}``
(shared memory per block, registers and spill stack per thread, from ``cuobjdump -res-usage``), then a summary
``{"kernels": [...], "driver_errors": [...]}``.

    python -m tests.kernels.gpu_compile [--arch 90]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from typing import Callable

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: @triton.jit must build compilable kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNEL_MODULES = ("cosine_loss", "diffusion_loss", "linear_cross_entropy", "mixed_attention", "rms_norm", "rope",
                  "routed_linear", "routed_mlp", "swiglu")
_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                  torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _RecordedLaunches:
    """Stands in for ``torch.library.wrap_triton``: ``wrap(kernel)[grid](*args, **kwargs)`` records."""

    def __init__(self):
        self.launches: list[tuple[triton.JITFunction, tuple, dict]] = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, kwargs))

        return _Grid()


def _gpu_dot_flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=False, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _as_gpu_launchers() -> list:
    """Make the kernel modules pick their GPU launch configurations on this CPU-only process."""
    common = importlib.import_module("mmfuse.kernels._common")
    common.triton_interpreting = lambda: True  # resolve_backend: let "triton" take CPU tensors
    modules = [importlib.import_module(f"mmfuse.kernels.{name}") for name in KERNEL_MODULES]
    for module in modules:
        if hasattr(module, "triton_interpreting"):
            module.triton_interpreting = lambda: False  # block sizes, warps and stages of a GPU
        if hasattr(module, "dot_flags"):
            module.dot_flags = _gpu_dot_flags
    return modules


def _cases(dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """One call per op and variant that selects a different kernel specialisation."""
    from mmfuse import kernels as K

    def t(*shape, grad=True):
        return torch.randn(*shape).to(dtype).requires_grad_(grad)

    def causal(batch, length):
        return (torch.zeros(batch, length, dtype=torch.int32),
                torch.arange(1, length + 1, dtype=torch.int32).expand(batch, length).contiguous())

    modality = torch.randint(0, 2, (96,))
    ids = torch.randint(0, 5000, (64,))
    starts, ends = causal(2, 192)
    dec_start, dec_end = torch.zeros(2, 1, dtype=torch.int32), torch.full((2, 1), 1024, dtype=torch.int32)
    return {
        "rms_norm": lambda: K.rms_norm(t(16, 4096), t(4096), backend="triton"),
        "routed_rms_norm": lambda: K.routed_rms_norm(t(96, 512), modality, [t(512), t(512)], backend="triton"),
        "rope": lambda: K.apply_rope(t(2, 8, 64, 128), t(2, 2, 64, 128), torch.randn(2, 64, 128),
                                     torch.randn(2, 64, 128), backend="triton"),
        "swiglu": lambda: K.swiglu(t(64, 1024), t(64, 1024), backend="triton"),
        **{f"mixed_attention D={d}": (lambda d=d: K.mixed_attention(t(2, 4, 192, d), t(2, 2, 192, d), t(2, 2, 192, d),
                                                                    starts, ends, backend="triton"))
           for d in (64, 128)},
        "mixed_attention soft-capped": lambda: K.mixed_attention(t(2, 4, 192, 128), t(2, 2, 192, 128),
                                                                 t(2, 2, 192, 128), starts, ends, softcap=50.0,
                                                                 backend="triton"),
        "mixed_attention decode split-KV": lambda: K.mixed_attention(
            t(2, 8, 1, 128, grad=False), t(2, 2, 1024, 128, grad=False), t(2, 2, 1024, 128, grad=False),
            dec_start, dec_end, backend="triton", num_splits=4),
        "mixed_attention tile counts": lambda: K.mixed_attention_tile_counts(
            t(2, 4, 192, 64, grad=False), t(2, 2, 192, 64, grad=False), t(2, 2, 192, 64, grad=False), starts, ends),
        "cosine_loss": lambda: K.cosine_loss(t(64, 1152), t(64, 1152), backend="triton"),
        "cosine_loss masked": lambda: K.cosine_loss(t(64, 1152), t(64, 1152), torch.rand(64) > 0.5, backend="triton"),
        "diffusion_loss": lambda: K.diffusion_loss(t(4, 4, 32, 32), t(4, 4, 32, 32), torch.rand(4), backend="triton"),
        "ddpm_training_pair": lambda: K.ddpm_training_pair(t(4, 4, 32, 32, grad=False), t(4, 4, 32, 32, grad=False),
                                                           torch.rand(4), "v_prediction", backend="triton"),
        "flow_matching_pair": lambda: K.flow_matching_pair(t(4, 4, 32, 32, grad=False), t(4, 4, 32, 32, grad=False),
                                                           torch.rand(4), backend="triton"),
        "linear_cross_entropy": lambda: K.linear_cross_entropy(t(64, 256), t(5000, 256), ids, label_smoothing=0.1,
                                                               backend="triton"),
        "linear_cross_entropy eval": lambda: K.linear_cross_entropy(t(64, 256, grad=False), t(5000, 256, grad=False),
                                                                    ids, backend="triton"),
        "routed_linear": lambda: K.routed_linear(t(96, 256), modality, [t(512, 256), t(512, 256)],
                                                 [t(512), t(512)], backend="triton"),
        "routed_swiglu_mlp": lambda: K.routed_swiglu_mlp(t(96, 256), modality, [t(1024, 256), t(1024, 256)],
                                                         [t(256, 512), t(256, 512)], backend="triton"),
    }


def _run(call: Callable[[], object]) -> None:
    """The op's forward and, where something requires grad, its backward (recorded, not run)."""
    out = call()
    outs = out if isinstance(out, tuple) else (out,)
    total = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()


def _signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one launch, in ``ASTSource`` terms."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    names = [p.name for p in kernel.params]
    if len(args) > len(names):
        raise TypeError(f"{kernel.__name__} takes {len(names)} arguments, the launch passes {len(args)}")
    values = {**dict(zip(names, args)), **kwargs}
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"{kernel.__name__}: the launch does not pass {missing}")
    signature, constexprs = {}, {}
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr or v is None or isinstance(v, str):
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _POINTER_TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {p.name} of type {type(v).__name__}")
    return signature, constexprs, options


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes per thread (where ptxas spills what registers cannot hold)."""
    import triton.backends.nvidia as nvidia

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"])}


def _compile(job: tuple) -> dict:
    """Compile one launch to a cubin; the row reports the shared memory it takes or the compiler's error."""
    module, name, signature, constexprs, options, arch = job
    kernel = getattr(importlib.import_module(module), name)
    row = {"kernel": name, "config": {**options, **{k: v for k, v in constexprs.items() if k.isupper()}}}
    try:
        binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32), options=options)
        row.update(ok=True, shared=binary.metadata.shared, **_resource_usage(binary.asm["cubin"]))
    except Exception as exc:  # noqa: BLE001 - the compiler's message is the result
        cause = f"\n<- {exc.__cause__}" if exc.__cause__ else ""
        row.update(ok=False, error=f"{type(exc).__name__}: " + "\n".join(str(exc).strip().splitlines()[-12:]) + cause)
    return row


def all_kernels(modules) -> set[str]:
    """Names of every ``@triton.jit`` function named ``*_kernel`` in the kernel modules."""
    return {name for m in modules for name, obj in vars(m).items()
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100 / H200)")
    args = parser.parse_args(argv)
    modules = _as_gpu_launchers()
    recorder = _RecordedLaunches()
    torch.library.wrap_triton = recorder
    driver_errors = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, call in _cases(dtype).items():
            try:
                _run(call)
            except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
                driver_errors.append(f"{name} ({dtype}): {type(exc).__name__}: {exc}")
    jobs, rows = {}, []
    for kernel, launch_args, launch_kwargs in recorder.launches:
        try:
            signature, constexprs, options = _signature(kernel, launch_args, launch_kwargs)
        except TypeError as exc:
            rows.append({"kernel": kernel.__name__, "ok": False, "error": str(exc)})
            continue
        key = json.dumps([kernel.__name__, signature, {k: str(v) for k, v in constexprs.items()}, options],
                         sort_keys=True)
        jobs.setdefault(key, (kernel.__module__, kernel.__name__, signature, constexprs, options, args.arch))
    # Compiling is CPU-bound and independent per launch: one process per core.
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        rows += pool.map(_compile, jobs.values())
    for row in rows:
        print(json.dumps(row), flush=True)
    compiled = {row["kernel"] for row in rows if row["ok"]}
    print(json.dumps({"kernels": sorted(all_kernels(modules)), "compiled": sorted(compiled),
                      "driver_errors": driver_errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
