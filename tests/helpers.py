"""Helpers shared by the tests (imported after conftest has set TRITON_INTERPRET)."""
import sys
from collections import Counter

import torch

from mmfuse.kernels._common import triton_interpreting


def triton_devices() -> list[str]:
    """Devices the Triton backend can run on in this process: CPU through the interpreter, CUDA compiled."""
    devices = []
    if triton_interpreting():
        devices.append("cpu")
    if torch.cuda.is_available() and not triton_interpreting():
        devices.append("cuda")
    return devices


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative norm error ||out - ref|| / ||ref|| in float64 (0 when both are 0)."""
    diff = (out.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else diff


def random_layout(B: int, L: int, gen: torch.Generator, padding: bool = True):
    """Random packed rows: several documents, image spans inside them, padding at the tail."""
    span = torch.zeros(B, L, dtype=torch.int64)
    doc = torch.zeros(B, L, dtype=torch.int64)
    for b in range(B):
        i, d, sid = 0, 0, 1
        pad_from = L - int(torch.randint(0, max(1, L // 4), (1,), generator=gen)) if padding else L
        while i < pad_from:
            n = int(torch.randint(1, max(2, L // 2), (1,), generator=gen))
            doc[b, i:min(i + n, pad_from)] = d
            j = i
            while j < min(i + n, pad_from):
                if torch.rand(1, generator=gen) < 0.3:
                    w = int(torch.randint(1, 12, (1,), generator=gen))
                    span[b, j:min(j + w, i + n, pad_from)] = sid
                    sid += 1
                    j += w
                else:
                    j += 1
            i += n
            d += 1
        doc[b, pad_from:] = -1
    return span, doc


def count_calls(monkeypatch, targets: dict[str, tuple[str, str]]) -> Counter:
    """Wrap each ``targets[kind] = (module, function)`` so that calls are counted under ``kind``
    (e.g. an op's Triton launcher: which backend a module really ran)."""
    counts = Counter()
    for kind, (module, name) in targets.items():
        original = getattr(sys.modules[module], name)

        def spy(*args, _kind=kind, _original=original, **kwargs):
            counts[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(sys.modules[module], name, spy)
    return counts
