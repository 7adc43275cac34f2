"""The code folders load only as mmfuse.*: a bare-name import (the repo root on sys.path) is an empty shadow."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bare", ["kernels", "models", "engine", "bench"])
def test_bare_name_import_is_an_empty_shadow(bare):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import mmfuse.{bare}; import {bare}; "
            f"assert getattr({bare}, '__file__', None) is None and not hasattr({bare}, '__path__'); "
            f"assert not any(k.startswith('{bare}.') for k in sys.modules); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_transformers_does_not_load_a_second_copy_of_the_ops():
    # transformers probes for the Hugging Face "kernels" package when it starts; with the repository
    # root on sys.path that probe used to import this repo's kernels/ a second time.
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import mmfuse.kernels; import transformers.activations; "
            "import transformers.utils.import_utils as u; assert not u.is_kernels_available(); "
            "assert 'kernels.mixed_attention' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_ops_come_from_one_module():
    module = importlib.import_module("mmfuse.kernels.routed_linear")
    assert module.__name__ == "mmfuse.kernels.routed_linear"
    assert "kernels.routed_linear" not in sys.modules
