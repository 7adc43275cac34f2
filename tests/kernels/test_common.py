import pytest
import torch

from mmfuse.kernels import default_backend
from mmfuse.kernels._common import check_tensor, check_values_in_range, resolve_backend, triton_interpreting


def test_none_picks_torch_on_cpu_and_triton_is_explicit():
    x = torch.zeros(2)
    assert resolve_backend(None, x) == "torch"
    assert resolve_backend("torch", x) == "torch"
    if triton_interpreting():
        assert resolve_backend("triton", x) == "triton"


def test_default_backend_applies_to_none_only_and_restores():
    x = torch.zeros(2)
    with default_backend("torch"):
        assert resolve_backend(None, x) == "torch"
        if triton_interpreting():
            with default_backend("triton"):
                assert resolve_backend(None, x) == "triton"
                assert resolve_backend("torch", x) == "torch"  # an explicit choice wins
            assert resolve_backend(None, x) == "torch"
    assert resolve_backend(None, x) == "torch"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.zeros(1))
    with pytest.raises(ValueError, match="backend"):
        with default_backend("jax"):
            pass


def test_check_tensor_messages():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        check_tensor("w", [1.0])
    with pytest.raises(ValueError, match=r"w must have shape \(3, \*\)"):
        check_tensor("w", torch.zeros(2, 2), shape=(3, None))
    with pytest.raises(TypeError, match=r"w must have dtype in \(int32\)"):
        check_tensor("w", torch.zeros(2), dtypes=(torch.int32,))


def test_check_values_in_range_names_the_argument_and_what_it_found():
    check_values_in_range("kv_end", torch.tensor([0, 3]), 0, 3, "[0, Lk=3]")  # both ends are allowed
    check_values_in_range("kv_end", torch.empty(0, dtype=torch.int32), 0, 3, "[0, Lk=3]")
    with pytest.raises(ValueError, match=r"kv_end values must lie in \[0, Lk=3\], got \[-1, 2\]"):
        check_values_in_range("kv_end", torch.tensor([2, -1]), 0, 3, "[0, Lk=3]")
    with pytest.raises(ValueError, match=r"modality values must lie in \[0, 2\), got \[0, 2\]"):
        check_values_in_range("modality", torch.tensor([0, 2]), 0, 1, "[0, 2)")
