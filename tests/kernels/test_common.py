import pytest
import torch

from mmfuse.kernels import apply_rope, default_backend, rms_norm, swiglu
from mmfuse.kernels._common import (CheckMemo, PairFacts, check_tensor, check_values_in_range, resolve_backend,
                                    tensor_metadata, triton_interpreting)


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


def test_check_memo_skips_only_the_key_that_last_passed():
    memo, ran = CheckMemo(), []
    a, b = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)

    def checks(name):
        ran.append(name)

    memo.check(None, checks, "no key")  # an argument that is not a tensor: always checked
    memo.check(tensor_metadata(a, a), checks, "first")
    memo.check(tensor_metadata(a, a.clone()), checks, "same metadata")  # other tensors, same metadata
    memo.check(tensor_metadata(a, b), checks, "dtype")
    memo.check(tensor_metadata(a, a[:1]), checks, "shape")
    memo.check(None, checks, "no key again")
    assert ran == ["no key", "first", "dtype", "shape", "no key again"]
    assert tensor_metadata(a, [1.0]) is None

    def failing(_):
        raise ValueError("bad")

    with pytest.raises(ValueError):
        memo.check(tensor_metadata(b, b), failing, None)
    with pytest.raises(ValueError):  # arguments that failed were not remembered as passed
        memo.check(tensor_metadata(b, b), failing, None)


def test_pair_facts_start_afresh_after_an_in_place_change():
    facts = PairFacts(kept=2)
    a, b = torch.zeros(3), torch.ones(3)
    facts.of(a, b)["x"] = 1
    assert facts.of(a, b) == {"x": 1} and facts.of(b, a) == {}  # a pair is ordered
    a.add_(1)
    assert facts.of(a, b) == {}
    facts.of(a, b)["x"] = 2
    facts.of(a.clone(), b)  # a third pair evicts the oldest, (b, a)
    assert facts.of(a, b) == {"x": 2} and len(facts.entries) == 2
    with torch.inference_mode():
        c = torch.zeros(3)
    assert facts.of(c, b) is None  # no version counter: nothing can be kept


def _rope_args(**bad):
    args = dict(q=torch.randn(1, 2, 1, 8), k=torch.randn(1, 1, 1, 8), cos=torch.randn(1, 1, 8), sin=torch.randn(1, 1, 8))
    return {**args, **bad}


# op -> (good arguments, [(bad arguments, the error it must raise)]): each bad call follows a good one,
# so the checks it must fail were remembered as passed for the good metadata.
CHECKED_OPS = {
    "rms_norm": (lambda **kw: rms_norm(**kw), dict(x=torch.randn(2, 8), weight=torch.ones(8)),
                 [(dict(weight=torch.ones(8, dtype=torch.float64)), (TypeError, "weight must have dtype")),
                  (dict(weight=torch.ones(7)), (ValueError, "weight must have shape")),
                  (dict(weight=torch.ones(8, device="meta")), (ValueError, "weight is on meta"))]),
    "swiglu": (lambda **kw: swiglu(**kw), dict(gate=torch.randn(2, 8), up=torch.randn(2, 8)),
               [(dict(up=torch.randn(2, 7)), (ValueError, "up must have shape")),
                (dict(up=[1.0]), (TypeError, "up must be a torch.Tensor"))]),
    "apply_rope": (lambda **kw: apply_rope(**kw), _rope_args(),
                   [(_rope_args(k=torch.randn(1, 1, 1, 8).double()), (TypeError, "k must have dtype")),
                    (_rope_args(sin=torch.randn(1, 1, 6)), (ValueError, "sin must have shape"))]),
}


@pytest.mark.parametrize("name", CHECKED_OPS)
@pytest.mark.parametrize("grad", [False, True])
def test_arguments_are_checked_after_a_call_that_passed(name, grad):
    call, good, bad_cases = CHECKED_OPS[name]
    with torch.set_grad_enabled(grad):
        for bad, (error, message) in bad_cases:
            call(**good)
            with pytest.raises(error, match=message):
                call(**{**good, **bad})
        call(**good)


def test_rope_checks_a_table_that_requires_grad_after_one_that_did_not():
    args = _rope_args()
    apply_rope(**args)
    with pytest.raises(ValueError, match="cos requires grad"):
        apply_rope(**{**args, "cos": args["cos"].clone().requires_grad_()})

